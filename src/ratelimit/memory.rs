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
    /// before it. A new `window_s` carries the estimate over (see
    /// [`Counter::follow`]).
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

    /// Adopts the policy as configured now (SPEC §7: a new `window_s`
    /// applies to the admissions already counted). A log takes the new
    /// window as it is. A window pair knows no admission times, so its
    /// estimate under the old window, rounded up, becomes the current count
    /// of the new window's current fixed window: nothing counted is lost, and
    /// it fades as any count does. A reload that changes how a policy counts
    /// starts it over.
    fn follow(&mut self, policy: &Policy, now_us: u64) {
        match (&mut *self, policy.algorithm) {
            (Self::Log { window_us, .. }, LimitAlgorithm::SlidingLog) => *window_us = policy.window_us(),
            (Self::Window { window_us, .. }, LimitAlgorithm::SlidingWindow) if *window_us == policy.window_us() => {}
            (Self::Window { window_us, .. }, LimitAlgorithm::SlidingWindow) => {
                let old_window = (*window_us).max(1);
                self.bring_to(now_us);
                let Self::Window { current, previous, .. } = *self else {
                    unreachable!("matched above")
                };
                let weighted = super::weighted(old_window, current, previous, now_us);
                let window = policy.window_us().max(1);
                *self = Self::Window {
                    window_us: window,
                    start_us: now_us - now_us % window,
                    current: weighted.div_ceil(u128::from(old_window)) as u64,
                    previous: 0,
                };
            }
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
            counter.follow(policy, now_us);
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

    fn window_policy(window_s: u64, max: u64) -> Policy {
        Policy::new("w", window_s, max, PolicyKey::Ip, "m").counted_by(LimitAlgorithm::SlidingWindow)
    }

    #[test]
    fn a_sliding_window_admits_max_in_a_burst_then_frees_slots_as_the_previous_window_fades() {
        let store = MemoryStore::new();
        let policy = window_policy(10, 4);
        let policies = [(0, &policy)];
        // Window [10 s, 20 s): four admitted at 12 s, the fifth refused.
        for expected_remaining in [3, 2, 1, 0] {
            let verdict = store.check_at("c", &policies, 12 * SECOND);
            assert!(verdict.admitted);
            assert_eq!(verdict.states[0].remaining, expected_remaining);
        }
        let refused = store.check_at("c", &policies, 12 * SECOND);
        assert!(!refused.admitted);
        // After 20 s the four weigh 4 × (1 - elapsed/10 s): below 3 from 22.5 s.
        assert_eq!(refused.states[0].reset_s, 11, "one slot frees at 22.5 s");
        assert!(!store.check_at("c", &policies, 22 * SECOND).admitted);
        let admitted = store.check_at("c", &policies, 22 * SECOND + SECOND / 2);
        assert!(admitted.admitted);
        assert_eq!(admitted.states[0].remaining, 0);
        // A window with nothing before it starts empty.
        assert!(store.check_at("c", &policies, 45 * SECOND).states[0].remaining == 3);
    }

    #[test]
    fn a_new_window_keeps_what_a_sliding_window_counted() {
        let store = MemoryStore::new();
        let short = window_policy(10, 3);
        let long = window_policy(20, 3);
        // Two admitted at 12 s in the 10 s window [10 s, 20 s).
        assert!(store.check_at("c", &[(0, &short)], 12 * SECOND).admitted);
        assert!(store.check_at("c", &[(0, &short)], 12 * SECOND).admitted);
        // Reloaded to 20 s: the two still count, so one more fits.
        let third = store.check_at("c", &[(0, &long)], 13 * SECOND);
        assert!(third.admitted);
        assert_eq!(third.states[0].remaining, 0);
        assert!(!store.check_at("c", &[(0, &long)], 13 * SECOND).admitted);
    }

    #[test]
    fn a_policy_whose_algorithm_changes_on_reload_starts_over() {
        let store = MemoryStore::new();
        let log = Policy::new("p", 10, 2, PolicyKey::Ip, "m");
        let window = Policy::new("p", 10, 2, PolicyKey::Ip, "m").counted_by(LimitAlgorithm::SlidingWindow);
        store.check_at("c", &[(0, &log)], SECOND);
        store.check_at("c", &[(0, &log)], SECOND);
        assert!(!store.check_at("c", &[(0, &log)], SECOND).admitted);
        assert!(store.check_at("c", &[(0, &window)], 2 * SECOND).admitted);
    }

    /// A fixed bursty trace (seeded): steady background traffic at half the
    /// limit plus, in three windows out of ten, a burst of 50 to 400 requests
    /// within a few seconds at a random point, often across a window edge.
    fn bursty_trace(window_us: u64, max: u64, windows: u64) -> Vec<u64> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut times = Vec::new();
        for window in 0..windows {
            let start = window * window_us;
            for _ in 0..max / 2 {
                times.push(start + next() % window_us);
            }
            if next() % 10 < 3 {
                let at = start + next() % window_us;
                let spread = SECOND + next() % (4 * SECOND);
                for _ in 0..50 + next() % 351 {
                    times.push(at + next() % spread);
                }
            }
        }
        times.sort_unstable();
        times
    }

    /// Replays `trace` through a sliding window and judges each decision
    /// against the exact rule applied to the window's own admissions:
    /// (over-admissions, under-admissions, admissions, largest count in any
    /// window).
    fn judge_sliding_window(trace: &[u64], window_s: u64, max: u64) -> (u64, u64, u64, u64) {
        let store = MemoryStore::new();
        let policy = window_policy(window_s, max);
        let window_us = window_s * SECOND;
        let mut admitted: VecDeque<u64> = VecDeque::new();
        let (mut over, mut under, mut total, mut largest) = (0, 0, 0, 0);
        for &at in trace {
            while admitted.front().is_some_and(|&t| t + window_us <= at + 1) {
                admitted.pop_front();
            }
            let exact_would_admit = (admitted.len() as u64) < max;
            if store.check_at("c", &[(0, &policy)], at + 1).admitted {
                total += 1;
                over += u64::from(!exact_would_admit);
                admitted.push_back(at + 1);
                largest = largest.max(admitted.len() as u64);
            } else {
                under += u64::from(exact_would_admit);
            }
        }
        (over, under, total, largest)
    }

    #[test]
    fn a_sliding_window_stays_near_the_exact_log_on_a_bursty_trace() {
        let (window_s, max) = (60, 100);
        let trace = bursty_trace(window_s * SECOND, max, 200);
        let (over, under, admitted, largest) = judge_sliding_window(&trace, window_s, max);
        let log = MemoryStore::new();
        let log_policy = Policy::new("l", window_s, max, PolicyKey::Ip, "m");
        let by_log = trace
            .iter()
            .filter(|&&at| log.check_at("c", &[(0, &log_policy)], at + 1).admitted)
            .count();
        eprintln!(
            "bursty trace: {} requests over 200 windows of {window_s} s, max {max}: \
             log admitted {by_log}, sliding window {admitted}; \
             over-admissions {over} ({:.2} %), under-admissions {under} ({:.2} %), \
             largest count in any {window_s} s: {largest} ({:+.1} % of max)",
            trace.len(),
            100.0 * over as f64 / admitted as f64,
            100.0 * under as f64 / trace.len() as f64,
            (largest as f64 / max as f64 - 1.0) * 100.0,
        );
        // The bound the README states for this trace.
        assert!(largest * 100 <= max * 135, "{largest} admissions within one window");
        assert!(
            over * 100 <= admitted * 7,
            "{over} of {admitted} admissions over the exact limit"
        );
    }

    #[test]
    fn a_burst_at_the_end_of_a_window_is_the_sliding_windows_worst_case() {
        // max at the very end of one window, then one request every 10 ms:
        // the previous window is weighted as if spread evenly, so the next
        // window admits in proportion to the time elapsed while the burst is
        // still inside the sliding window.
        let (window_s, max) = (10, 100);
        // (`judge_sliding_window` decides at `at + 1`.)
        let mut trace: Vec<u64> = (0..max).map(|_| 10 * SECOND - 2).collect();
        trace.extend((1..1000).map(|step| 10 * SECOND + step * 10_000));
        let (_, _, _, largest) = judge_sliding_window(&trace, window_s, max);
        eprintln!("adversarial trace: largest count in any {window_s} s: {largest} for max {max}");
        assert!(largest < 2 * max, "never twice max");
        assert!(largest > max + max / 2, "the worst case is well above max: {largest}");
    }
}
