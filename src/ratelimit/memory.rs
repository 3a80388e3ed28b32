//! The sliding log in process: for one gateway instance (`backend =
//! "memory"`), and as the `local` fallback while Redis is unreachable.
//!
//! Logs are sharded by client key, and all of one client's policies live in
//! one shard, so a decision takes exactly one lock and workers serving
//! different clients rarely meet. Expired logs are dropped when touched, and
//! every [`SWEEP_EVERY`] decisions the next shard in turn is swept, so every
//! shard is swept regularly whichever clients are active and memory stays bounded
//! by the clients active within a window.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{verdict_from_counts, Policy, Verdict};

const SHARDS: usize = 32;
/// Decisions between two sweeps of one shard.
pub const SWEEP_EVERY: u64 = 1024;

#[derive(Default)]
struct Shard {
    /// Client → one log per policy, by name: a reload that keeps a policy's
    /// name keeps its log.
    clients: HashMap<String, Vec<(Arc<str>, Log)>>,
}

impl Shard {
    fn sweep(&mut self, now_us: u64) {
        self.clients.retain(|_, logs| {
            logs.retain_mut(|(_, log)| {
                log.prune(now_us);
                !log.admissions.is_empty()
            });
            !logs.is_empty()
        });
    }
}

struct Log {
    /// The policy's window as of its latest decision (a reload may change
    /// it; the new one applies to the admissions already logged).
    window_us: u64,
    admissions: VecDeque<u64>,
}

impl Log {
    fn prune(&mut self, now_us: u64) {
        while self.admissions.front().is_some_and(|&at| at + self.window_us <= now_us) {
            self.admissions.pop_front();
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
        let logs = shard.clients.get_mut(client).expect("inserted above");

        let mut positions = Vec::with_capacity(policies.len());
        let mut counts = Vec::with_capacity(policies.len());
        for (_, policy) in policies {
            let position = match logs.iter().position(|(held, _)| **held == *policy.name) {
                Some(position) => position,
                None => {
                    logs.push((
                        policy.name.clone(),
                        Log {
                            window_us: policy.window_us(),
                            admissions: VecDeque::new(),
                        },
                    ));
                    logs.len() - 1
                }
            };
            let log = &mut logs[position].1;
            log.window_us = policy.window_us();
            log.prune(now_us);
            positions.push(position);
            counts.push(log.admissions.len() as u64);
        }
        let admitted = policies
            .iter()
            .zip(&counts)
            .all(|((_, policy), &count)| count < policy.max);
        let mut oldest = Vec::with_capacity(policies.len());
        for (&position, count) in positions.iter().zip(counts.iter_mut()) {
            let log = &mut logs[position].1;
            if admitted {
                log.admissions.push_back(now_us);
                *count += 1;
            }
            oldest.push(log.admissions.front().copied().unwrap_or(now_us));
        }
        if logs.iter().all(|(_, log)| log.admissions.is_empty()) {
            // Nothing is held for this client (a refusal records nothing).
            shard.clients.remove(client);
        }
        verdict_from_counts(policies, admitted, now_us, &counts, &oldest)
    }

    /// Drops the logs of every policy not named in `kept` (a reload removed
    /// them), so a policy added back later under the same name starts empty.
    pub fn retain_policies(&self, kept: &[&str]) {
        for shard in &self.shards {
            let mut shard = lock(shard);
            shard.clients.retain(|_, logs| {
                logs.retain(|(name, _)| kept.contains(&&**name));
                !logs.is_empty()
            });
        }
    }

    /// Clients with admissions held, across shards.
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
