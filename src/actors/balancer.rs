//! `BalancerActor`: hands out round-robin targets over a service's healthy
//! instances.
//!
//! One balancer runs on each HTTP worker's own arbiter, so a request's
//! `PickTarget` never crosses threads. The rotation must still hold for the
//! whole process, so the balancers share one atomic cursor per service: n
//! sequential picks over k healthy instances give each n/k ± 1 whichever
//! workers serve them. The registry pushes every change of a service's
//! healthy set to each balancer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::{Actor, Context, Handler, Message};

/// Which instance should serve the next request of `service`.
/// `exclude` skips an instance that just failed (the one retry of SPEC §3).
#[derive(Debug, Message)]
#[rtype(result = "Option<usize>")]
pub struct PickTarget {
    pub service: usize,
    pub exclude: Option<usize>,
}

/// The registry's latest view of one service's healthy instances.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct HealthySetChanged {
    pub service: usize,
    pub healthy: Arc<[usize]>,
}

/// One cursor per service, shared by every worker's balancer.
pub type SharedCursors = Arc<[AtomicUsize]>;

pub fn shared_cursors(services: usize) -> SharedCursors {
    (0..services).map(|_| AtomicUsize::new(0)).collect()
}

pub struct BalancerActor {
    /// Healthy instance indices per service.
    healthy: Vec<Arc<[usize]>>,
    cursors: SharedCursors,
}

impl BalancerActor {
    /// `instance_counts[s]` instances of service `s`, all healthy until the
    /// registry says otherwise (instances start healthy, SPEC §5).
    pub fn new(instance_counts: &[usize], cursors: SharedCursors) -> Self {
        let healthy = instance_counts.iter().map(|&count| (0..count).collect()).collect();
        Self { healthy, cursors }
    }
}

impl Actor for BalancerActor {
    type Context = Context<Self>;
}

impl Handler<PickTarget> for BalancerActor {
    type Result = Option<usize>;

    fn handle(&mut self, msg: PickTarget, _: &mut Context<Self>) -> Option<usize> {
        let healthy = self.healthy.get(msg.service)?;
        let cursor = self.cursors.get(msg.service)?;
        pick_round_robin(healthy, cursor, msg.exclude)
    }
}

impl Handler<HealthySetChanged> for BalancerActor {
    type Result = ();

    fn handle(&mut self, msg: HealthySetChanged, _: &mut Context<Self>) {
        if let Some(slot) = self.healthy.get_mut(msg.service) {
            *slot = msg.healthy;
        }
    }
}

/// The next instance in rotation. With `exclude` (the retry after a failed
/// attempt) it is the healthy instance after the excluded one, taken without
/// advancing the shared cursor, so a failing instance does not also push the
/// rotation and end up first in line for every request.
pub fn pick_round_robin(healthy: &[usize], cursor: &AtomicUsize, exclude: Option<usize>) -> Option<usize> {
    let count = healthy.len();
    if count == 0 {
        return None;
    }
    if let Some(position) = exclude.and_then(|excluded| healthy.iter().position(|&index| index == excluded)) {
        return (count > 1).then(|| healthy[(position + 1) % count]);
    }
    let ticket = cursor.fetch_add(1, Ordering::Relaxed);
    Some(healthy[ticket % count])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(healthy: &[usize], picks: usize, instances: usize) -> Vec<usize> {
        let cursor = AtomicUsize::new(0);
        let mut counts = vec![0; instances];
        for _ in 0..picks {
            counts[pick_round_robin(healthy, &cursor, None).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn rotation_is_even_over_the_healthy_instances() {
        assert_eq!(counts(&[0, 1], 10, 2), vec![5, 5]);
        assert_eq!(counts(&[0, 1, 2], 10, 3), vec![4, 3, 3]);
        assert_eq!(counts(&[0, 2], 9, 3), vec![5, 0, 4]);
    }

    #[test]
    fn nothing_healthy_gives_no_target() {
        assert_eq!(pick_round_robin(&[], &AtomicUsize::new(0), None), None);
    }

    #[test]
    fn exclusion_moves_to_the_next_instance_without_advancing_the_rotation() {
        let cursor = AtomicUsize::new(0);
        assert_eq!(pick_round_robin(&[0, 1, 2], &cursor, Some(1)), Some(2));
        assert_eq!(pick_round_robin(&[0, 1, 2], &cursor, Some(2)), Some(0));
        assert_eq!(pick_round_robin(&[3], &cursor, Some(3)), None);
        assert_eq!(cursor.load(Ordering::Relaxed), 0);
        assert_eq!(
            pick_round_robin(&[3], &cursor, Some(1)),
            Some(3),
            "an excluded unhealthy instance is no obstacle"
        );
    }

    #[test]
    fn a_failing_instance_is_first_only_for_its_share_of_requests() {
        let cursor = AtomicUsize::new(0);
        let mut first_tries_of_failing = 0;
        for _ in 0..10 {
            let first = pick_round_robin(&[0, 1], &cursor, None).unwrap();
            if first == 0 {
                first_tries_of_failing += 1;
                assert_eq!(pick_round_robin(&[0, 1], &cursor, Some(0)), Some(1));
            }
        }
        assert_eq!(first_tries_of_failing, 5);
    }
}
