//! The limits in a shared Redis, one node or a Redis Cluster: every gateway
//! instance counts in the same keys, so a policy holds for the fleet.
//!
//! One decision is one atomic Lua script (EVALSHA, reloaded on NOSCRIPT by
//! `redis::Script`) over all the policies counted at one point; it reads the
//! time from Redis `TIME`, so gateway clocks never matter. A `sliding_log`
//! policy's key is a sorted set of admissions, a `sliding_window` one's a
//! hash of two counters; every key gets a PEXPIRE of what it must remember,
//! so Redis holds only the clients active within it. Every key of one
//! decision carries the client's `{…}` hash tag, so on a cluster the script
//! runs on the one node owning that slot. Each call is bounded by
//! `rate_limit.redis_timeout_ms`, pool waits and redirections included.
//!
//! A worker keeps one multiplexed connection and pipelines every request's
//! script over it; the deadpool pool only hands out a new one (with its
//! timeouts) after a failure. Checking a connection out per request would
//! cost a PING round trip each time (deadpool-redis's recycle check) and cap
//! a worker at pool-size requests in flight.
//!
//! That cached connection dies quietly when Redis restarts: nothing is sent
//! on it until the next decision, which then fails at once with an IO error.
//! Such a decision is retried once on a connection from the pool (which
//! PINGs what it holds, drops the dead and reconnects) inside the same
//! timeout, so a restart that completed while no request waited makes no
//! decision fall back to `on_backend_error` (SPEC §12); every worker of every
//! gateway would otherwise count its first request after the restart in
//! process, beside the shared log.
//!
//! On a cluster, a worker keeps one [`ClusterConnection`]: a multiplexed
//! handle on a connection per node that follows `MOVED`/`ASK`, refreshes
//! the slot map and reconnects by itself when a node's connection breaks,
//! so it is kept across errors (deadpool-redis's cluster pool builds its
//! client from the URLs alone, so no timeouts, retry bound or TLS roots
//! could be set, and checking one out would PING per decision for nothing).
//! `SCRIPT LOAD` after a NOSCRIPT goes to every master. What it does not
//! notice is a master that stops answering without closing its connections
//! (its host lost, a partition): it keeps sending that master's slots to it
//! after a replica has taken over. So a decision that times out starts a new
//! handle, made afresh from the seeds, which learns the slot map as the live
//! nodes see it; see [`ClusterHandle`].

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_util::future::{FutureExt, LocalBoxFuture, Shared};

use deadpool_redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConnection};
use deadpool_redis::redis::aio::{ConnectionLike, MultiplexedConnection};
use deadpool_redis::redis::{Client, IntoConnectionInfo, Script, ScriptInvocation, TlsCertificates};
use deadpool_redis::{Manager, Pool, Runtime};

use super::{redis_key, verdict_from_tallies, Policy, Tally, Verdict};
use crate::settings::{LimitAlgorithm, RateLimitSettings};

/// Connections per worker's pool; one is in use at a time (see above).
const POOL_SIZE_PER_WORKER: usize = 2;

/// Attempts of one cluster command across redirections and reconnections;
/// `redis_timeout_ms` bounds them all.
const CLUSTER_RETRIES: u32 = 3;

/// Least time between two attempts to make a cluster handle, per worker:
/// while the cluster is unreachable, a request with no handle gets the last
/// attempt's error at once rather than a connection to every seed.
const CLUSTER_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// KEYS: one per policy. ARGV[1]: a unique member suffix; then per policy its
/// algorithm (`l` log, `w` window), window (µs), max, key lifetime (ms).
/// Returns {admitted, now_us, a_1, b_1, …}: for a log its count and oldest
/// admission (µs), for a window its current and previous counts; counts
/// include this request when admitted.
///
/// Every argument handed to `redis.call` is a string: Lua numbers are
/// doubles, and Redis (7.0 at least) formats each one with `%.17g`, which
/// was the costliest part of the script. Log members are `<µs>:<suffix>`,
/// so the oldest admission time is read from the member rather than from a
/// formatted score. Microseconds since the epoch (about 2^51) are exact in a
/// double, and `math.fmod` is exact, so the window boundaries match the
/// gateway's integer arithmetic.
///
/// A window key is a hash: `w` the window (µs) it counts in, `s` the current
/// fixed window's start (µs), `c` its count, `p` the previous window's
/// count. Counted in another window (a reload changed `window_s`), its
/// estimate under that window, rounded up, becomes the current count of the
/// new one, as in the memory store. A key of the other type (the policy's
/// algorithm changed on reload) is dropped and starts over.
const DECIDE: &str = r#"
local time = redis.call('TIME')
local now_text = time[1] .. string.rep('0', 6 - #time[2]) .. time[2]
local now = tonumber(now_text)
local member = now_text .. ':' .. ARGV[1]
local held = {}
local admitted = 1
for i = 1, #KEYS do
  local kind, window, max = ARGV[4 * i - 2], tonumber(ARGV[4 * i - 1]), tonumber(ARGV[4 * i])
  if kind == 'l' then
    local cutoff = string.format('%d', now - window)
    local pruned = redis.pcall('ZREMRANGEBYSCORE', KEYS[i], '-inf', cutoff)
    if type(pruned) == 'table' and pruned.err then redis.call('DEL', KEYS[i]) end
    local count = redis.call('ZCARD', KEYS[i])
    held[i] = { count }
    if count >= max then admitted = 0 end
  else
    local elapsed = math.fmod(now, window)
    local start = string.format('%d', now - elapsed)
    local current, previous = 0, 0
    local stored = redis.pcall('HMGET', KEYS[i], 's', 'c', 'p', 'w')
    if stored.err then
      redis.call('DEL', KEYS[i])
    elseif stored[1] then
      local counted_in = tonumber(stored[4]) or window
      local held_elapsed = math.fmod(now, counted_in)
      local held_start = now - held_elapsed
      local c, p = tonumber(stored[2]) or 0, tonumber(stored[3]) or 0
      if tonumber(stored[1]) == held_start then
        current, previous = c, p
      elseif tonumber(stored[1]) == held_start - counted_in then
        current, previous = 0, c
      end
      if counted_in ~= window then
        current = math.ceil((previous * (counted_in - held_elapsed) + current * counted_in) / counted_in)
        previous = 0
      end
    end
    held[i] = { current, previous, start }
    if previous * (window - elapsed) + (current + 1) * window > max * window then admitted = 0 end
  end
end
local result = { admitted, now }
for i = 1, #KEYS do
  if ARGV[4 * i - 2] == 'l' then
    local count = held[i][1]
    if admitted == 1 then
      redis.call('ZADD', KEYS[i], now_text, member)
      redis.call('PEXPIRE', KEYS[i], ARGV[4 * i + 1])
      count = count + 1
    end
    local oldest = redis.call('ZRANGE', KEYS[i], '0', '0')[1]
    result[#result + 1] = count
    result[#result + 1] = oldest and string.match(oldest, '^%d+') or now_text
  else
    local current, previous = held[i][1], held[i][2]
    if admitted == 1 then
      current = current + 1
      redis.call('HSET', KEYS[i], 'w', ARGV[4 * i - 1], 's', held[i][3], 'c', string.format('%d', current),
        'p', string.format('%d', previous))
      redis.call('PEXPIRE', KEYS[i], ARGV[4 * i + 1])
    end
    result[#result + 1] = current
    result[#result + 1] = previous
  end
end
return result
"#;

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("pool: {0}")]
    Pool(#[from] deadpool_redis::PoolError),
    #[error("redis: {0}")]
    Redis(#[from] deadpool_redis::redis::RedisError),
    #[error("unexpected script reply")]
    Reply,
    #[error("redis cluster: {0}")]
    Cluster(String),
}

impl RedisError {
    /// Nothing answered in time: this decision's deadline, or the Redis
    /// client's own response timeout.
    fn is_timeout(&self) -> bool {
        match self {
            Self::Timeout(_) => true,
            Self::Redis(err) => err.is_timeout(),
            Self::Pool(_) | Self::Reply | Self::Cluster(_) => false,
        }
    }

    /// The connection the script went out on is dead or unusable (closed,
    /// reset, unparsable reply), as opposed to Redis answering with an error
    /// or not answering in time. A failure to get a connection from the pool
    /// is not one: the pool has just tried a fresh connection itself.
    fn is_broken_connection(&self) -> bool {
        match self {
            Self::Redis(err) => err.is_io_error() || err.is_unrecoverable_error(),
            Self::Timeout(_) | Self::Pool(_) | Self::Reply | Self::Cluster(_) => false,
        }
    }
}

pub struct RedisStore {
    backend: Backend,
    script: Script,
    key_prefix: String,
    timeout: Duration,
}

enum Backend {
    Node {
        pool: Pool,
        /// The worker's connection, until it fails.
        connection: RefCell<Option<MultiplexedConnection>>,
    },
    Cluster(Rc<ClusterHandle>),
}

/// A worker's handle on the cluster, and how it is replaced.
///
/// A handle is made by a task of its own, not by the request that needs
/// it: discovery connects to every seed and every node of the slot map and
/// waits for them all, so a node that accepts and never answers costs a
/// whole `connection_timeout`, longer than a request may wait, and a
/// request's deadline must not cancel it. The task installs what it made.
///
/// Requests that find no handle wait for the one being made. A decision
/// that times out on the handle in use starts a replacement in the
/// background, and every request keeps using the old handle until the new
/// one is installed: the clients of the masters that still answer are
/// served throughout. One attempt at a time, and at most one per
/// [`CLUSTER_RETRY_INTERVAL`].
struct ClusterHandle {
    client: ClusterClient,
    /// The handle in use and its number (which attempt made it).
    current: RefCell<Option<(u64, ClusterConnection)>>,
    /// The attempt under way, awaited by every request that finds no handle.
    making: RefCell<Option<MakingCluster>>,
    attempts: Cell<u64>,
    last_attempt: Cell<Option<Instant>>,
    /// Why the latest attempt failed, until one succeeds.
    last_failure: RefCell<Option<String>>,
}

/// An attempt to make a handle: its number and handle, or why it failed
/// (as text, so that every waiter gets it).
type MakingCluster = Shared<LocalBoxFuture<'static, Result<(u64, ClusterConnection), String>>>;

impl ClusterHandle {
    /// The handle in use, or the one being made (started when none is and
    /// the last attempt is old enough).
    async fn get(self: &Rc<Self>) -> Result<(u64, ClusterConnection), RedisError> {
        if let Some(current) = self.current.borrow().as_ref() {
            return Ok(current.clone());
        }
        let under_way = self.making.borrow().clone();
        let pending = match under_way {
            Some(pending) => pending,
            None => match self.start_attempt() {
                Some(pending) => pending,
                None => {
                    let why = self.last_failure.borrow().clone();
                    return Err(RedisError::Cluster(why.unwrap_or_else(|| "unreachable".to_owned())));
                }
            },
        };
        pending.await.map_err(RedisError::Cluster)
    }

    /// A decision on handle `number` timed out: its replacement is started,
    /// unless that handle was already replaced or one is under way.
    fn timed_out(self: &Rc<Self>, number: u64) {
        let in_use = self.current.borrow().as_ref().map(|(current, _)| *current);
        if in_use == Some(number) && self.making.borrow().is_none() {
            self.start_attempt();
        }
    }

    /// Starts an attempt on a task of its own, unless one was started less
    /// than [`CLUSTER_RETRY_INTERVAL`] ago.
    fn start_attempt(self: &Rc<Self>) -> Option<MakingCluster> {
        let now = Instant::now();
        if self
            .last_attempt
            .get()
            .is_some_and(|last| now.duration_since(last) < CLUSTER_RETRY_INTERVAL)
        {
            return None;
        }
        self.last_attempt.set(Some(now));
        let number = self.attempts.get() + 1;
        self.attempts.set(number);
        let handle = Rc::clone(self);
        let task = actix_rt::spawn(async move {
            let made = handle.client.get_async_connection().await;
            handle.making.borrow_mut().take();
            match made {
                Ok(cluster) => {
                    *handle.current.borrow_mut() = Some((number, cluster.clone()));
                    handle.last_failure.borrow_mut().take();
                    Ok((number, cluster))
                }
                Err(err) => {
                    *handle.last_failure.borrow_mut() = Some(err.to_string());
                    Err(err.to_string())
                }
            }
        });
        let pending = async move { task.await.unwrap_or_else(|err| Err(err.to_string())) }
            .boxed_local()
            .shared();
        *self.making.borrow_mut() = Some(pending.clone());
        Some(pending)
    }
}

impl RedisStore {
    /// `roots`: the PEM trust anchors for `rediss://` when they are not the
    /// public web roots alone (see [`crate::tls::redis_root_certificates`]).
    pub fn new(settings: &RateLimitSettings, roots: Option<&[u8]>) -> Result<Self, String> {
        let timeout = Duration::from_millis(settings.redis_timeout_ms);
        let certificates = || TlsCertificates {
            client_tls: None,
            root_cert: roots.map(<[u8]>::to_vec),
        };
        let backend = if settings.redis_cluster.is_empty() {
            let url = settings.redis_url.expose();
            let info = match is_tls(url) {
                true => Client::build_with_tls(url, certificates()).map(|client| client.get_connection_info().clone()),
                false => url.into_connection_info(),
            }
            .map_err(|err| format!("rate_limit.redis_url: {err}"))?;
            let manager = Manager::new(info).map_err(|err| format!("rate_limit.redis_url: {err}"))?;
            // deadpool waits forever by default; no request may.
            let pool = Pool::builder(manager)
                .max_size(POOL_SIZE_PER_WORKER)
                .wait_timeout(Some(timeout))
                .create_timeout(Some(timeout))
                .recycle_timeout(Some(timeout))
                .runtime(Runtime::Tokio1)
                .build()
                .map_err(|err| format!("rate_limit.redis_url: {err}"))?;
            Backend::Node {
                pool,
                connection: RefCell::new(None),
            }
        } else {
            let seeds: Vec<&str> = settings.redis_cluster.iter().map(|seed| seed.expose()).collect();
            let mut builder = ClusterClientBuilder::new(seeds.clone())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(CLUSTER_RETRIES);
            if seeds.iter().any(|seed| is_tls(seed)) {
                builder = builder.certs(certificates());
            }
            let client = builder
                .build()
                .map_err(|err| format!("rate_limit.redis_cluster: {err}"))?;
            Backend::Cluster(Rc::new(ClusterHandle {
                client,
                current: RefCell::new(None),
                making: RefCell::new(None),
                attempts: Cell::new(0),
                last_attempt: Cell::new(None),
                last_failure: RefCell::new(None),
            }))
        };
        Ok(Self {
            backend,
            script: Script::new(DECIDE),
            key_prefix: settings.key_prefix.clone(),
            timeout,
        })
    }

    /// One decision. On one node, a failure on a connection that turns out
    /// to be broken (Redis restarted, or closed it) is retried once on a
    /// fresh one from the pool, within the same `redis_timeout_ms`: only then
    /// is it an outage (SPEC §12). A cluster handle retries by itself.
    pub async fn check(&self, client: &str, policies: &[(usize, &Policy)]) -> Result<Verdict, RedisError> {
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(uuid::Uuid::new_v4().simple().to_string());
        for (_, policy) in policies {
            let (kind, remembered_us) = match policy.algorithm {
                LimitAlgorithm::SlidingLog => ("l", policy.window_us()),
                // The previous window counts until the current one ends.
                LimitAlgorithm::SlidingWindow => ("w", policy.window_us().saturating_mul(2)),
            };
            invocation
                .key(redis_key(&self.key_prefix, client, &policy.name))
                .arg(kind)
                .arg(policy.window_us())
                .arg(policy.max)
                .arg(remembered_us.div_ceil(1000));
        }
        // The cluster handle a decision went out on, to replace if it timed out.
        let used_handle = Cell::new(None);
        let decide = async {
            match &self.backend {
                Backend::Node { pool, connection } => {
                    let mut node = node_connection(pool, connection).await?;
                    match run_script(&mut node, &invocation, policies).await {
                        Err(err) if err.is_broken_connection() => {
                            // The pool checks what it still holds
                            // (deadpool-redis PINGs on recycle, and drops
                            // what fails) and connects anew when nothing
                            // is left.
                            connection.borrow_mut().take();
                            let mut fresh = node_connection(pool, connection).await?;
                            run_script(&mut fresh, &invocation, policies).await
                        }
                        result => result,
                    }
                }
                Backend::Cluster(handle) => {
                    let (number, mut cluster) = handle.get().await?;
                    used_handle.set(Some(number));
                    run_script(&mut cluster, &invocation, policies).await
                }
            }
        };
        let result = match actix_rt::time::timeout(self.timeout, decide).await {
            Ok(result) => result,
            Err(_) => Err(RedisError::Timeout(self.timeout)),
        };
        match (&self.backend, &result) {
            // Start over from the pool, which reconnects with its timeouts.
            (Backend::Node { connection, .. }, Err(_)) => drop(connection.borrow_mut().take()),
            // A master that went silent: a new handle, from the seeds.
            (Backend::Cluster(handle), Err(err)) if err.is_timeout() => {
                if let Some(number) = used_handle.get() {
                    handle.timed_out(number);
                }
            }
            _ => {}
        }
        result
    }
}

/// The worker's connection to its one node, or a new one from the pool,
/// kept until it fails.
async fn node_connection(
    pool: &Pool,
    connection: &RefCell<Option<MultiplexedConnection>>,
) -> Result<MultiplexedConnection, RedisError> {
    if let Some(node) = connection.borrow().as_ref() {
        return Ok(node.clone());
    }
    let pooled = pool.get().await?;
    let node = MultiplexedConnection::clone(&pooled);
    *connection.borrow_mut() = Some(node.clone());
    Ok(node)
}

/// A `rediss://` URL (schemes are case-insensitive).
fn is_tls(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|url| url.scheme() == "rediss")
}

async fn run_script(
    connection: &mut impl ConnectionLike,
    invocation: &ScriptInvocation<'_>,
    policies: &[(usize, &Policy)],
) -> Result<Verdict, RedisError> {
    let reply: Vec<i64> = invocation.invoke_async(connection).await?;
    let (head, per_policy) = reply.split_at_checked(2).ok_or(RedisError::Reply)?;
    if per_policy.len() != policies.len() * 2 {
        return Err(RedisError::Reply);
    }
    let admitted = head[0] == 1;
    let now_us = head[1].max(0) as u64;
    let tallies: Vec<Tally> = policies
        .iter()
        .zip(per_policy.chunks_exact(2))
        .map(|((_, policy), pair)| {
            let (a, b) = (pair[0].max(0) as u64, pair[1].max(0) as u64);
            match policy.algorithm {
                LimitAlgorithm::SlidingLog => Tally::Log { count: a, oldest_us: b },
                LimitAlgorithm::SlidingWindow => Tally::Window {
                    current: a,
                    previous: b,
                },
            }
        })
        .collect();
    Ok(verdict_from_tallies(policies, admitted, now_us, &tallies))
}
