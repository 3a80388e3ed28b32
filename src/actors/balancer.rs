//! `BalancerActor`: keeps one worker's round-robin targets and its view of
//! the configuration in force.
//!
//! One balancer runs on each HTTP worker's own arbiter, beside the requests
//! it serves, so a [`PickTarget`] never crosses threads. The registry sends
//! it every change of a service's healthy set and every new [`Deploy`]ment;
//! it applies both to the worker's [`WorkerContext`] on the worker's own
//! thread, so requests read their configuration with no lock. The rotation
//! must still hold for the whole process, so the balancers share one atomic
//! cursor per service: n sequential picks over k healthy instances give each
//! n/k ± 1 whichever workers serve them.

use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::{Actor, Context, Handler, Message};

use super::registry::Deployment;
use crate::worker::WorkerContext;

/// Which instance should serve the next request of `service` in the
/// configuration of `generation`. `exclude` skips an instance that just
/// failed (the one retry of SPEC §3).
#[derive(Debug, Message)]
#[rtype(result = "Result<Option<usize>, SwappedOut>")]
pub struct PickTarget {
    pub generation: u64,
    pub service: usize,
    pub exclude: Option<usize>,
}

/// A reload swapped the asking request's configuration out: it picks from
/// its own snapshot instead.
#[derive(Debug)]
pub struct SwappedOut;

/// The registry's latest view of one service's healthy instances, as
/// positions in the deployment of `generation`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct HealthySetChanged {
    pub generation: u64,
    pub service: usize,
    pub healthy: Arc<[usize]>,
}

/// The configuration in force and every service's healthy set in it.
/// Answered once the worker serves it.
#[derive(Clone, Message)]
#[rtype(result = "()")]
pub struct Deploy {
    pub deployment: Arc<Deployment>,
    pub healthy: Vec<Arc<[usize]>>,
}

pub struct BalancerActor {
    worker: Rc<WorkerContext>,
}

impl BalancerActor {
    pub fn new(worker: Rc<WorkerContext>) -> Self {
        Self { worker }
    }
}

impl Actor for BalancerActor {
    type Context = Context<Self>;
}

impl Handler<PickTarget> for BalancerActor {
    type Result = Result<Option<usize>, SwappedOut>;

    fn handle(&mut self, msg: PickTarget, _: &mut Context<Self>) -> Self::Result {
        self.worker.pick(msg.generation, msg.service, msg.exclude)
    }
}

impl Handler<HealthySetChanged> for BalancerActor {
    type Result = ();

    fn handle(&mut self, msg: HealthySetChanged, _: &mut Context<Self>) {
        self.worker.set_healthy(msg.generation, msg.service, msg.healthy);
    }
}

impl Handler<Deploy> for BalancerActor {
    type Result = ();

    fn handle(&mut self, msg: Deploy, _: &mut Context<Self>) {
        self.worker.deploy(&msg.deployment, msg.healthy);
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
