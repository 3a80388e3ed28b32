//! Rate limits that hold across every gateway instance (SPEC §4).
//!
//! A policy admits at most `max` requests per client key in any window of
//! `window_s` seconds, counted one of two ways:
//!
//! - `sliding_log` (exact): the time of every admission per key and policy,
//!   so there is no 2×max burst at a window edge; memory grows with `max`.
//! - `sliding_window` (SPEC §12): two fixed-window counters per key, the
//!   previous one weighted by the share of it the sliding window still
//!   covers; constant memory whatever `max` is, approximate at window edges
//!   (the README states the measured error).
//!
//! Rejected requests are not recorded. All the policies counted at one point
//! of the pipeline are decided together, all or nothing: when one is over its
//! limit, none records the request.
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
use crate::settings::{BackendErrorMode, LimitAlgorithm, PolicyKey, RateLimitBackend, RateLimitSettings};

/// One configured policy, compiled once.
#[derive(Debug)]
pub struct Policy {
    /// What counts carry over by: a reload that keeps the name keeps the counts.
    pub name: Arc<str>,
    pub window: Duration,
    pub max: u64,
    pub key: PolicyKey,
    pub message: String,
    pub algorithm: LimitAlgorithm,
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
            algorithm: LimitAlgorithm::SlidingLog,
            header: HeaderValue::from_str(&format!("{max};w={window_s}")).expect("digits are a valid header value"),
        }
    }

    pub fn counted_by(self, algorithm: LimitAlgorithm) -> Self {
        Self { algorithm, ..self }
    }

    pub fn window_us(&self) -> u64 {
        self.window.as_micros() as u64
    }

    /// Whether one more request fits, given what the counter held before it.
    /// A fixed-window pair admits while its weighted estimate plus this
    /// request stays within `max`.
    pub fn admits(&self, before: Tally, now_us: u64) -> bool {
        match before {
            Tally::Log { count, .. } => count < self.max,
            Tally::Window { .. } => {
                let window = u128::from(self.window_us().max(1));
                self.weighted(before, now_us) + window <= u128::from(self.max) * window
            }
        }
    }

    /// A fixed-window pair's estimate of the admissions in the sliding window
    /// ending now, times the window (µs) to stay in integers: the current
    /// window's count, plus the previous one's weighted by the part of it the
    /// sliding window still covers.
    fn weighted(&self, tally: Tally, now_us: u64) -> u128 {
        let Tally::Window { current, previous } = tally else {
            return 0;
        };
        weighted(self.window_us(), current, previous, now_us)
    }

    /// Where this policy stands once a decision is recorded in `tally`.
    pub fn state(&self, index: usize, tally: Tally, now_us: u64) -> PolicyState {
        let (remaining, wait_us) = match tally {
            Tally::Log { count, oldest_us } => (
                self.max.saturating_sub(count),
                oldest_us.saturating_add(self.window_us()).saturating_sub(now_us),
            ),
            Tally::Window { current, previous } => self.window_state(current, previous, now_us),
        };
        PolicyState {
            policy: index,
            limit: self.max,
            remaining,
            reset_s: wait_us.div_ceil(1_000_000).max(1),
        }
    }

    /// Remaining and the wait (µs) until one more slot frees for a
    /// fixed-window pair: the estimate falls at `previous` per µs until the
    /// current window ends, then at `current` per µs through the next one
    /// (the current count becomes the previous, weighted down to nothing).
    fn window_state(&self, current: u64, previous: u64, now_us: u64) -> (u64, u64) {
        let window = u128::from(self.window_us().max(1));
        let estimate = self.weighted(Tally::Window { current, previous }, now_us);
        let capacity = u128::from(self.max) * window;
        let remaining = (capacity.saturating_sub(estimate) / window) as u64;
        // One more slot frees when the estimate falls to max - remaining - 1.
        let target = capacity.saturating_sub((u128::from(remaining) + 1) * window);
        let to_fall = estimate.saturating_sub(target);
        let left_in_window = window - u128::from(now_us) % window;
        let falls_this_window = u128::from(previous) * left_in_window;
        let wait = if to_fall <= falls_this_window {
            to_fall.div_ceil(u128::from(previous).max(1))
        } else if current > 0 {
            left_in_window + (to_fall - falls_this_window).div_ceil(u128::from(current))
        } else {
            left_in_window + window
        };
        (remaining, u64::try_from(wait).unwrap_or(u64::MAX))
    }
}

/// A fixed-window pair's estimate of the admissions in the sliding window
/// of `window_us` ending at `now_us`, times the window: the current fixed
/// window's count, plus the previous one's weighted by the part of it the
/// sliding window still covers.
pub fn weighted(window_us: u64, current: u64, previous: u64, now_us: u64) -> u128 {
    let window = window_us.max(1);
    let still_covered = u128::from(window - now_us % window);
    u128::from(previous) * still_covered + u128::from(current) * u128::from(window)
}

/// What one policy's counter holds for one client key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tally {
    /// `sliding_log`: admissions within the window, and the oldest one's time
    /// (µs, on the decision's clock).
    Log { count: u64, oldest_us: u64 },
    /// `sliding_window`: the counts of the current fixed window (aligned on
    /// multiples of the window on the decision's clock) and of the one before.
    Window { current: u64, previous: u64 },
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

/// Turns what each policy's counter holds after one decision into a verdict.
///
/// A refusal always names an exhausted policy: should the store refuse
/// where this arithmetic still finds room (the script computes in doubles,
/// which round once `max` × window passes 2^53 µs), the most restrictive
/// policy is reported at 0 and the refusal stands.
pub fn verdict_from_tallies(policies: &[(usize, &Policy)], admitted: bool, now_us: u64, tallies: &[Tally]) -> Verdict {
    let mut verdict = Verdict {
        admitted,
        states: policies
            .iter()
            .zip(tallies)
            .map(|((index, policy), &tally)| policy.state(*index, tally, now_us))
            .collect(),
    };
    if !admitted && verdict.refusing().is_none() {
        if let Some(most) = verdict.most_restrictive() {
            for state in verdict.states.iter_mut().filter(|state| **state == most) {
                state.remaining = 0;
            }
        }
    }
    verdict
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
    Redis(Box<redis::RedisStore>),
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
    /// `roots`: the trust anchors for `rediss://`, when not the public web
    /// roots alone ([`crate::gateway::Gateway::redis_roots`]).
    pub fn new(settings: &RateLimitSettings, roots: Option<&[u8]>, shared: &SharedLimits) -> Result<Self, String> {
        let store = match settings.backend {
            RateLimitBackend::Memory => Store::Memory,
            RateLimitBackend::Redis => Store::Redis(Box::new(redis::RedisStore::new(settings, roots)?)),
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
        let tally = Tally::Log {
            count: 2,
            oldest_us: 1_500_000,
        };
        let verdict = verdict_from_tallies(&[(0, &policy)], true, 5_000_000, &[tally]);
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
    fn a_refusal_always_names_an_exhausted_policy() {
        let policy = Policy::new("p", 10, 3, PolicyKey::Ip, "m").counted_by(LimitAlgorithm::SlidingWindow);
        let room_left = Tally::Window {
            current: 1,
            previous: 0,
        };
        let verdict = verdict_from_tallies(&[(0, &policy)], false, 5_000_000, &[room_left]);
        assert_eq!(verdict.refusing().map(|state| state.remaining), Some(0));
    }

    #[test]
    fn keys_carry_a_cluster_hash_tag() {
        assert_eq!(
            redis_key("gatehouse:rl", "127.0.0.1", "default"),
            "gatehouse:rl:{127.0.0.1}:default"
        );
    }
}
