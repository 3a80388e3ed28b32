//! The limits in process: for one gateway instance (`backend = "memory"`),
//! and as the `local` fallback while Redis is unreachable. Both algorithms,
//! with the same arithmetic as the Redis script.
//!
//! Counters are sharded by client key, and all of one client's policies live in
//! one shard, so a decision takes exactly one lock and workers serving
//! different clients rarely meet. Expired counters are dropped when touched, and
//! every [`SWEEP_EVERY`] decisions the next shard in turn is swept, so every
//! shard is swept regularly whichever clients are active and memory stays bounded
//! by the clients active within a window.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{verdict_from_tallies, Policy, Tally, Verdict};
use crate::settings::LimitAlgorithm;

const SHARDS: usize = 32;
/// Decisions between two sweeps of one shard.
pub const SWEEP_EVERY: u64 = 1024;

#[derive(Default)]
struct Shard {
    /// Client → one counter per policy, by name: a reload that keeps a
    /// policy's name keeps its counts.
    clients: HashMap<String, Vec<(Arc<str>, Counter)>>,
}

impl Shard {
    fn sweep(&mut self, now_us: u64) {
        self.clients.retain(|_, counters| {
            counters.retain_mut(|(_, counter)| {
                counter.bring_to(now_us);
                !counter.is_empty()
            });
            !counters.is_empty()
        });
    }
}

enum Counter {
    /// `sliding_log`. `window_us` is the policy's window as of its latest
    /// decision: a reload may change it, and the new one applies to the
    /// admissions already logged.
    Log { window_us: u64, admissions: VecDeque<u64> },
    /// `sliding_window`: the fixed window starting at `start_us` and the one
    /// before it. A new `window_s` starts the counts over.
    Window {
        window_us: u64,
        start_us: u64,
        current: u64,
        previous: u64,
    },
}

impl Counter {
    fn new(policy: &Policy) -> Self {
        match policy.algorithm {
            LimitAlgorithm::SlidingLog => Self::Log {
                window_us: policy.window_us(),
                admissions: VecDeque::new(),
            },
            LimitAlgorithm::SlidingWindow => Self::Window {
                window_us: policy.window_us(),
                start_us: 0,
                current: 0,
                previous: 0,
            },
        }
    }

    /// Adopts the policy as configured now: its window, or a fresh counter
    /// when a reload changed how it counts.
    fn follow(&mut self, policy: &Policy) {
        match (&mut *self, policy.algorithm) {
            (Self::Log { window_us, .. }, LimitAlgorithm::SlidingLog) => *window_us = policy.window_us(),
            (Self::Window { window_us, .. }, LimitAlgorithm::SlidingWindow) if *window_us == policy.window_us() => {}
            _ => *self = Self::new(policy),
        }
    }

    /// Drops what has left the window as of `now_us`.
    fn bring_to(&mut self, now_us: u64) {
        match self {
            Self::Log { window_us, admissions } => {
                while admissions.front().is_some_and(|&at| at + *window_us <= now_us) {
                    admissions.pop_front();
                }
            }
            Self::Window {
                window_us,
                start_us,
                current,
                previous,
            } => {
                let window = (*window_us).max(1);
                let start = now_us - now_us % window;
                if *start_us == start {
                    return;
                }
                *previous = if *start_us + window == start { *current } else { 0 };
                *current = 0;
                *start_us = start;
            }
        }
    }

    fn tally(&self, now_us: u64) -> Tally {
        match self {
            Self::Log { admissions, .. } => Tally::Log {
                count: admissions.len() as u64,
                oldest_us: admissions.front().copied().unwrap_or(now_us),
            },
            Self::Window { current, previous, .. } => Tally::Window {
                current: *current,
                previous: *previous,
            },
        }
    }

    fn record(&mut self, now_us: u64) {
        match self {
            Self::Log { admissions, .. } => admissions.push_back(now_us),
            Self::Window { current, .. } => *current += 1,
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Self::Log { admissions, .. } => admissions.is_empty(),
            Self::Window { current, previous, .. } => *current == 0 && *previous == 0,
        }
    }
}

pub struct MemoryStore {
    shards: Vec<Mutex<Shard>>,
    decisions: AtomicU64,
    epoch: Instant,
}

fn lock(shard: &Mutex<Shard>) -> std::sync::MutexGuard<'_, Shard> {
    // A panic while a shard was held cannot leave a log in a state worse than
    // a lost admission, so keep serving rather than fail every request.
    shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            decisions: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64 + 1
    }

    fn shard(&self, client: &str) -> &Mutex<Shard> {
        let mut hasher = DefaultHasher::new();
        client.hash(&mut hasher);
        &self.shards[hasher.finish() as usize % SHARDS]
    }

    /// Decides one request of `client` against `policies`, all or nothing.
    pub fn check(&self, client: &str, policies: &[(usize, &Policy)]) -> Verdict {
        self.check_at(client, policies, self.now_us())
    }

    fn check_at(&self, client: &str, policies: &[(usize, &Policy)], now_us: u64) -> Verdict {
        let decision = self.decisions.fetch_add(1, Ordering::Relaxed) + 1;
        if decision.is_multiple_of(SWEEP_EVERY) {
            let next = (decision / SWEEP_EVERY) as usize % SHARDS;
            lock(&self.shards[next]).sweep(now_us);
        }
        let mut shard = lock(self.shard(client));
        if !shard.clients.contains_key(client) {
            shard
                .clients
                .insert(client.to_owned(), Vec::with_capacity(policies.len()));
        }
        let counters = shard.clients.get_mut(client).expect("inserted above");

        let mut positions = Vec::with_capacity(policies.len());
        let mut admitted = true;
        for (_, policy) in policies {
            let position = match counters.iter().position(|(held, _)| **held == *policy.name) {
                Some(position) => position,
                None => {
                    counters.push((policy.name.clone(), Counter::new(policy)));
                    counters.len() - 1
                }
            };
            let counter = &mut counters[position].1;
            counter.follow(policy);
            counter.bring_to(now_us);
            admitted &= policy.admits(counter.tally(now_us), now_us);
            positions.push(position);
        }
        let mut tallies = Vec::with_capacity(policies.len());
        for &position in &positions {
            let counter = &mut counters[position].1;
            if admitted {
                counter.record(now_us);
            }
            tallies.push(counter.tally(now_us));
        }
        if counters.iter().all(|(_, counter)| counter.is_empty()) {
            // Nothing is held for this client (a refusal records nothing).
            shard.clients.remove(client);
        }
        verdict_from_tallies(policies, admitted, now_us, &tallies)
    }

    /// Drops the counts of every policy not named in `kept` (a reload
    /// removed them), so a policy added back later under the same name starts
    /// empty.
    pub fn retain_policies(&self, kept: &[&str]) {
        for shard in &self.shards {
            let mut shard = lock(shard);
            shard.clients.retain(|_, counters| {
                counters.retain(|(name, _)| kept.contains(&&**name));
                !counters.is_empty()
            });
        }
    }

    /// Clients with counts held, across shards.
    pub fn tracked_clients(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).clients.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::PolicyKey;

    const SECOND: u64 = 1_000_000;

    #[test]
    fn admits_max_per_window_then_refuses_without_recording() {
        let store = MemoryStore::new();
        let policy = Policy::new("p", 10, 3, PolicyKey::Ip, "slow down");
        let policies = [(0, &policy)];
        for (i, expected_remaining) in [2, 1, 0].into_iter().enumerate() {
            let verdict = store.check_at("c", &policies, (1 + i as u64) * SECOND);
            assert!(verdict.admitted);
            assert_eq!(verdict.states[0].remaining, expected_remaining);
        }
        let refused = store.check_at("c", &policies, 4 * SECOND);
        assert!(!refused.admitted);
        assert_eq!(refused.states[0].reset_s, 7, "the oldest admission leaves at 11 s");
        // Retrying does not extend the wait: refusals are not recorded.
        assert!(!store.check_at("c", &policies, 10 * SECOND).admitted);
        assert!(
            store.check_at("c", &policies, 11 * SECOND).admitted,
            "the first slot frees at 11 s"
        );
        assert!(!store.check_at("c", &policies, 11 * SECOND + 5).admitted);
    }

    #[test]
    fn there_is_no_burst_at_a_window_edge() {
        let store = MemoryStore::new();
        let policy = Policy::new("p", 10, 4, PolicyKey::Ip, "m");
        let policies = [(0, &policy)];
        let mut admitted_in_any_window = Vec::new();
        for step in 0..400u64 {
            let now = step * SECOND / 10;
            if store.check_at("c", &policies, now + 1).admitted {
                admitted_in_any_window.push(now);
            }
        }
        for &start in &admitted_in_any_window {
            let in_window = admitted_in_any_window
                .iter()
                .filter(|&&t| t >= start && t < start + 10 * SECOND)
                .count();
            assert!(in_window <= 4, "{in_window} admissions within 10 s of {start}");
        }
    }

    #[test]
    fn policies_counted_together_are_all_or_nothing() {
        let store = MemoryStore::new();
        let tight = Policy::new("tight", 60, 1, PolicyKey::Ip, "m");
        let loose = Policy::new("loose", 60, 10, PolicyKey::Ip, "m");
        let both = [(0, &tight), (1, &loose)];
        assert!(store.check_at("c", &both, SECOND).admitted);
        let refused = store.check_at("c", &both, 2 * SECOND);
        assert!(!refused.admitted);
        assert_eq!(
            refused.states[1].remaining, 9,
            "the loose policy did not record the refused request"
        );
        assert_eq!(refused.refusing().unwrap().policy, 0);
    }

    #[test]
    fn expired_logs_are_evicted() {
        let store = MemoryStore::new();
        let policy = Policy::new("p", 1, 5, PolicyKey::Ip, "m");
        for client in 0..500 {
            store.check_at(&format!("client-{client}"), &[(0, &policy)], SECOND);
        }
        assert_eq!(store.tracked_clients(), 500);
        for decision in 0..(SWEEP_EVERY * SHARDS as u64) {
            store.check_at(
                &format!("later-{}", decision % 7),
                &[(0, &policy)],
                10 * SECOND + decision,
            );
        }
        assert!(store.tracked_clients() <= 7, "{} logs left", store.tracked_clients());
    }
}
