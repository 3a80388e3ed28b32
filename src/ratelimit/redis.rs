//! The sliding log in a shared Redis: every gateway instance counts in the
//! same sorted sets, so a policy holds for the fleet.
//!
//! One decision is one atomic Lua script (EVALSHA, reloaded on NOSCRIPT by
//! `redis::Script`) over all the policies counted at one point; it reads the
//! time from Redis `TIME`, so gateway clocks never matter. Every key gets a
//! PEXPIRE of its window, so Redis holds only the clients active within one.
//! Each call is bounded by `rate_limit.redis_timeout_ms`, pool waits included.
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

use std::cell::RefCell;
use std::time::Duration;

use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::redis::{Script, ScriptInvocation};
use deadpool_redis::{Config, Pool, PoolConfig, Runtime, Timeouts};

use super::{redis_key, verdict_from_counts, Policy, Verdict};
use crate::settings::RateLimitSettings;

/// Connections per worker's pool; one is in use at a time (see above).
const POOL_SIZE_PER_WORKER: usize = 2;

/// KEYS: one sorted set per policy. ARGV[1]: a unique member suffix; then per
/// policy its window (µs), max and key lifetime (ms). Returns {admitted,
/// now_us, count_1, oldest_1, …}: counts include this request when admitted.
///
/// Every argument handed to `redis.call` is a string: Lua numbers are
/// doubles, and Redis (7.0 at least) formats each one with `%.17g`, which
/// was the costliest part of the script. Members are `<µs>:<suffix>`, so the
/// oldest admission time is read from the member rather than from a
/// formatted score. Microseconds since the epoch (about 2^51) are exact in a
/// double.
const SLIDING_LOG: &str = r#"
local time = redis.call('TIME')
local now_text = time[1] .. string.rep('0', 6 - #time[2]) .. time[2]
local now = tonumber(now_text)
local member = now_text .. ':' .. ARGV[1]
local counts = {}
local admitted = 1
for i = 1, #KEYS do
  local cutoff = string.format('%d', now - tonumber(ARGV[3 * i - 1]))
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', cutoff)
  counts[i] = redis.call('ZCARD', KEYS[i])
  if counts[i] >= tonumber(ARGV[3 * i]) then admitted = 0 end
end
local result = { admitted, now }
for i = 1, #KEYS do
  if admitted == 1 then
    redis.call('ZADD', KEYS[i], now_text, member)
    redis.call('PEXPIRE', KEYS[i], ARGV[3 * i + 1])
    counts[i] = counts[i] + 1
  end
  local oldest = redis.call('ZRANGE', KEYS[i], '0', '0')[1]
  result[#result + 1] = counts[i]
  result[#result + 1] = oldest and string.match(oldest, '^%d+') or now_text
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
}

impl RedisError {
    /// The connection the script went out on is dead or unusable (closed,
    /// reset, unparsable reply), as opposed to Redis answering with an error
    /// or not answering in time. A failure to get a connection from the pool
    /// is not one: the pool has just tried a fresh connection itself.
    fn is_broken_connection(&self) -> bool {
        match self {
            Self::Redis(err) => err.is_io_error() || err.is_unrecoverable_error(),
            Self::Timeout(_) | Self::Pool(_) | Self::Reply => false,
        }
    }
}

pub struct RedisStore {
    pool: Pool,
    script: Script,
    key_prefix: String,
    timeout: Duration,
    /// The worker's connection, until it fails.
    connection: RefCell<Option<MultiplexedConnection>>,
}

impl RedisStore {
    pub fn new(settings: &RateLimitSettings) -> Result<Self, String> {
        let timeout = Duration::from_millis(settings.redis_timeout_ms);
        let mut config = Config::from_url(settings.redis_url.expose());
        config.pool = Some(PoolConfig {
            max_size: POOL_SIZE_PER_WORKER,
            // deadpool waits forever by default; no request may.
            timeouts: Timeouts {
                wait: Some(timeout),
                create: Some(timeout),
                recycle: Some(timeout),
            },
            ..PoolConfig::default()
        });
        let pool = config
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|err| format!("rate_limit.redis_url: {err}"))?;
        Ok(Self {
            pool,
            script: Script::new(SLIDING_LOG),
            key_prefix: settings.key_prefix.clone(),
            timeout,
            connection: RefCell::new(None),
        })
    }

    /// One decision. A failure on a connection that turns out to be broken
    /// (Redis restarted, or closed it) is retried once on a fresh one from
    /// the pool, within the same `redis_timeout_ms`: only then is it an
    /// outage (SPEC §12).
    pub async fn check(&self, client: &str, policies: &[(usize, &Policy)]) -> Result<Verdict, RedisError> {
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(uuid::Uuid::new_v4().simple().to_string());
        for (_, policy) in policies {
            invocation
                .key(redis_key(&self.key_prefix, client, &policy.name))
                .arg(policy.window_us())
                .arg(policy.max)
                .arg(policy.window_us().div_ceil(1000));
        }
        let decide = async {
            match self.run_script(&invocation, policies).await {
                Err(err) if err.is_broken_connection() => {
                    // The pool checks what it still holds (deadpool-redis
                    // PINGs on recycle, and drops what fails) and connects
                    // anew when nothing is left.
                    self.connection.borrow_mut().take();
                    self.run_script(&invocation, policies).await
                }
                result => result,
            }
        };
        let result = match actix_rt::time::timeout(self.timeout, decide).await {
            Ok(result) => result,
            Err(_) => Err(RedisError::Timeout(self.timeout)),
        };
        if result.is_err() {
            // Start over from the pool, which reconnects with its timeouts.
            self.connection.borrow_mut().take();
        }
        result
    }

    async fn connection(&self) -> Result<MultiplexedConnection, RedisError> {
        if let Some(connection) = self.connection.borrow().as_ref() {
            return Ok(connection.clone());
        }
        let pooled = self.pool.get().await?;
        let connection = MultiplexedConnection::clone(&pooled);
        *self.connection.borrow_mut() = Some(connection.clone());
        Ok(connection)
    }

    async fn run_script(
        &self,
        invocation: &ScriptInvocation<'_>,
        policies: &[(usize, &Policy)],
    ) -> Result<Verdict, RedisError> {
        let mut connection = self.connection().await?;
        let reply: Vec<i64> = invocation.invoke_async(&mut connection).await?;
        let (head, per_policy) = reply.split_at_checked(2).ok_or(RedisError::Reply)?;
        if per_policy.len() != policies.len() * 2 {
            return Err(RedisError::Reply);
        }
        let admitted = head[0] == 1;
        let now_us = head[1].max(0) as u64;
        let counts: Vec<u64> = per_policy.iter().step_by(2).map(|&count| count.max(0) as u64).collect();
        let oldest: Vec<u64> = per_policy
            .iter()
            .skip(1)
            .step_by(2)
            .map(|&at| at.max(0) as u64)
            .collect();
        Ok(verdict_from_counts(policies, admitted, now_us, &counts, &oldest))
    }
}
