//! Rate limits that hold across every gateway instance (SPEC §4).
//!
//! A policy admits at most `max` requests per client key in any window of
//! `window_s` seconds: a sliding log of admission times per key and policy,
//! so there is no 2×max burst at a window edge, and rejected requests are not
//! recorded. All the policies counted at one point of the pipeline are
//! decided together, all or nothing: when one is over its limit, none records
//! the request.
//!
//! - [`memory`]: the log in process (`backend = "memory"`, and the `local`
//!   fallback while Redis is unreachable).
//! - [`redis`]: one atomic Lua script per decision in a shared Redis, timed by
//!   Redis `TIME` so gateway clocks never matter.

pub mod memory;
pub mod redis;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::HeaderValue;

use crate::error::GatewayError;
use crate::settings::{BackendErrorMode, PolicyKey, RateLimitBackend, RateLimitSettings};

/// One configured policy, compiled once.
#[derive(Debug)]
pub struct Policy {
    /// What counts carry over by: a reload that keeps the name keeps the counts.
    pub name: Arc<str>,
    pub window: Duration,
    pub max: u64,
    pub key: PolicyKey,
    pub message: String,
    /// `RateLimit-Policy: <max>;w=<window_s>`.
    pub header: HeaderValue,
}

impl Policy {
    pub fn new(name: &str, window_s: u64, max: u64, key: PolicyKey, message: &str) -> Self {
        Self {
            name: name.into(),
            window: Duration::from_secs(window_s),
            max,
            key,
            message: message.to_owned(),
            header: HeaderValue::from_str(&format!("{max};w={window_s}")).expect("digits are a valid header value"),
        }
    }

    pub fn window_us(&self) -> u64 {
        self.window.as_micros() as u64
    }
}

/// Where one policy stands for one key after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyState {
    /// Index into the policies of the request's snapshot.
    pub policy: usize,
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the oldest admission in the window leaves it.
    pub reset_s: u64,
}

impl PolicyState {
    /// SPEC §4: the most restrictive is the lowest remaining, then the
    /// smaller max.
    pub fn more_restrictive(self, other: Self) -> Self {
        if (other.remaining, other.limit) < (self.remaining, self.limit) {
            other
        } else {
            self
        }
    }
}

/// The outcome of counting one request against a set of policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub admitted: bool,
    pub states: Vec<PolicyState>,
}

impl Verdict {
    /// The state whose headers the response carries.
    pub fn most_restrictive(&self) -> Option<PolicyState> {
        self.states.iter().copied().reduce(PolicyState::more_restrictive)
    }

    /// The policy that refused the request: the most restrictive one at 0,
    /// with `reset_s` the longest wait among the exhausted ones, since the
    /// request is admitted only when every one of them has a free slot.
    pub fn refusing(&self) -> Option<PolicyState> {
        let exhausted = self.states.iter().copied().filter(|state| state.remaining == 0);
        let longest_wait = exhausted.clone().map(|state| state.reset_s).max()?;
        let refusing = exhausted.reduce(PolicyState::more_restrictive)?;
        Some(PolicyState {
            reset_s: longest_wait,
            ..refusing
        })
    }
}

/// Turns the raw counts of one decision into a verdict. `counts[i]` is the
/// number of admissions in policy i's window after the decision, `oldest[i]`
/// the time of its oldest admission (µs, same clock as `now`).
pub fn verdict_from_counts(
    policies: &[(usize, &Policy)],
    admitted: bool,
    now_us: u64,
    counts: &[u64],
    oldest_us: &[u64],
) -> Verdict {
    let states = policies
        .iter()
        .zip(counts.iter().zip(oldest_us))
        .map(|((index, policy), (&count, &oldest))| {
            let frees_at = oldest.saturating_add(policy.window_us());
            PolicyState {
                policy: *index,
                limit: policy.max,
                remaining: policy.max.saturating_sub(count),
                reset_s: frees_at.saturating_sub(now_us).div_ceil(1_000_000).max(1),
            }
        })
        .collect();
    Verdict { admitted, states }
}

/// The Redis key of one policy for one client: the braces are a Redis Cluster
/// hash tag, so every key one script touches lives in one slot.
pub fn redis_key(prefix: &str, client: &str, policy: &str) -> String {
    format!("{prefix}:{{{client}}}:{policy}")
}

/// Counts requests; one per worker (its Redis pool is the worker's), sharing
/// the in-process store and the outage flag with every other worker. The
/// policies come with each request, from the configuration it uses.
pub struct RateLimiter {
    store: Store,
    /// In-process log: the memory backend, or the `local` fallback.
    local: Arc<memory::MemoryStore>,
    on_backend_error: BackendErrorMode,
    /// Set while Redis is failing, so the outage is logged once.
    outage: Arc<AtomicBool>,
}

enum Store {
    Memory,
    Redis(redis::RedisStore),
}

/// State shared by every worker's limiter, kept for the process's lifetime
/// (reloads included).
#[derive(Clone, Default)]
pub struct SharedLimits {
    pub local: Arc<memory::MemoryStore>,
    pub outage: Arc<AtomicBool>,
}

impl RateLimiter {
    /// Builds a worker's limiter; with the Redis backend this creates the
    /// worker's pool (connections are opened lazily, so a Redis that is down
    /// at start-up does not stop the gateway).
    pub fn new(settings: &RateLimitSettings, shared: &SharedLimits) -> Result<Self, String> {
        let store = match settings.backend {
            RateLimitBackend::Memory => Store::Memory,
            RateLimitBackend::Redis => Store::Redis(redis::RedisStore::new(settings)?),
        };
        Ok(Self {
            store,
            local: shared.local.clone(),
            on_backend_error: settings.on_backend_error,
            outage: shared.outage.clone(),
        })
    }

    /// Counts one request of `client` against the policies at `selected`
    /// in `policies`, all or nothing. `Ok(None)` means the request is
    /// admitted without counting (`on_backend_error = "allow"` during an
    /// outage).
    pub async fn check(
        &self,
        client: &str,
        policies: &[Policy],
        selected: &[usize],
    ) -> Result<Option<Verdict>, GatewayError> {
        let selected: Vec<(usize, &Policy)> = selected.iter().map(|&index| (index, &policies[index])).collect();
        let redis = match &self.store {
            Store::Memory => return Ok(Some(self.local.check(client, &selected))),
            Store::Redis(redis) => redis,
        };
        match redis.check(client, &selected).await {
            Ok(verdict) => {
                if self.outage.swap(false, Ordering::Relaxed) {
                    tracing::info!("rate limit backend is reachable again");
                }
                Ok(Some(verdict))
            }
            Err(err) => {
                crate::metrics::rate_limit_backend_error();
                if !self.outage.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %err, mode = ?self.on_backend_error, "rate limit backend unreachable");
                }
                match self.on_backend_error {
                    BackendErrorMode::Local => Ok(Some(self.local.check(client, &selected))),
                    BackendErrorMode::Allow => Ok(None),
                    BackendErrorMode::Deny => Err(GatewayError::RateLimitBackendUnavailable),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(remaining: u64, limit: u64) -> PolicyState {
        PolicyState {
            policy: limit as usize,
            limit,
            remaining,
            reset_s: 1,
        }
    }

    #[test]
    fn the_most_restrictive_is_the_lowest_remaining_then_the_smaller_max() {
        let verdict = Verdict {
            admitted: true,
            states: vec![state(5, 100), state(3, 50), state(3, 10)],
        };
        assert_eq!(verdict.most_restrictive(), Some(state(3, 10)));
        assert_eq!(verdict.refusing(), None);
    }

    #[test]
    fn retry_after_waits_for_every_exhausted_policy() {
        let verdict = Verdict {
            admitted: false,
            states: vec![
                PolicyState {
                    policy: 0,
                    limit: 3,
                    remaining: 0,
                    reset_s: 45,
                },
                PolicyState {
                    policy: 1,
                    limit: 2,
                    remaining: 0,
                    reset_s: 10,
                },
                PolicyState {
                    policy: 2,
                    limit: 1,
                    remaining: 1,
                    reset_s: 99,
                },
            ],
        };
        let refusing = verdict.refusing().unwrap();
        assert_eq!(refusing.policy, 1, "the message is the most restrictive policy's");
        assert_eq!(refusing.reset_s, 45, "but the wait is the longest among the exhausted");
    }

    #[test]
    fn reset_counts_until_the_oldest_admission_leaves() {
        let policy = Policy::new("p", 10, 3, PolicyKey::Ip, "m");
        let verdict = verdict_from_counts(&[(0, &policy)], true, 5_000_000, &[2], &[1_500_000]);
        assert_eq!(
            verdict.states,
            vec![PolicyState {
                policy: 0,
                limit: 3,
                remaining: 1,
                reset_s: 7
            }]
        );
    }

    #[test]
    fn keys_carry_a_cluster_hash_tag() {
        assert_eq!(
            redis_key("gatehouse:rl", "127.0.0.1", "default"),
            "gatehouse:rl:{127.0.0.1}:default"
        );
    }
}
