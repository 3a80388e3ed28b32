//! `RegistryActor`: owns every service's instances and their health.
//!
//! Health changes arrive from two sides: the `HealthChecker`'s active probes
//! (`ReportProbe`) and the proxy's passive observations (`ReportPassiveFailure`,
//! sent once an instance has failed `health.passive_failures` requests in a
//! row). A flip is decided here only, logged once, and pushed to every
//! worker's balancer as the service's new healthy set. An instance starts
//! healthy, and its first probe's result applies at once; the thresholds
//! govern every change after that.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::{Actor, Context, Handler, Message, MessageResponse, Recipient};
use serde::Serialize;

use super::balancer::HealthySetChanged;
use crate::gateway::Gateway;
use crate::settings::HealthSettings;

/// Result of one active probe of one instance.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ReportProbe {
    pub service: usize,
    pub instance: usize,
    pub checked_at: SystemTime,
    pub elapsed: Duration,
    /// `Err` carries a short reason shown in `/health`.
    pub outcome: Result<(), String>,
}

/// An instance failed `passive_failures` proxied requests in a row.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ReportPassiveFailure {
    pub service: usize,
    pub instance: usize,
    pub reason: String,
}

/// A worker's balancer asks to be told about healthy-set changes; it is sent
/// the current sets at once.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SubscribeBalancer(pub Recipient<HealthySetChanged>);

/// The body of `GET /health`.
#[derive(Debug, Message)]
#[rtype(result = "HealthReport")]
pub struct GetHealthReport;

#[derive(Debug, Clone, Serialize, MessageResponse)]
pub struct HealthReport {
    /// `ok`, `degraded` or `down`.
    pub status: &'static str,
    pub services: BTreeMap<String, ServiceReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceReport {
    /// `healthy` when at least one instance is.
    pub status: &'static str,
    pub instances: Vec<InstanceReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstanceReport {
    pub url: String,
    pub healthy: bool,
    pub response_time_ms: Option<u64>,
    pub last_check: Option<String>,
    pub consecutive_failures: u32,
    pub error: Option<String>,
}

/// Consecutive proxying failures per instance, shared by every worker so the
/// count is the process's, not one worker's. Only the crossing of the
/// threshold is sent to the registry; successes are a plain atomic store.
#[derive(Debug)]
pub struct PassiveFailures {
    counters: Vec<Vec<AtomicU32>>,
    threshold: u32,
}

impl PassiveFailures {
    pub fn new(gateway: &Gateway, threshold: u32) -> Self {
        let counters = gateway
            .services
            .iter()
            .map(|service| service.instances.iter().map(|_| AtomicU32::new(0)).collect())
            .collect();
        Self { counters, threshold }
    }

    /// True exactly once per streak: when this failure reaches the threshold.
    pub fn record_failure(&self, service: usize, instance: usize) -> bool {
        let count = self.counters[service][instance].fetch_add(1, Ordering::Relaxed) + 1;
        count == self.threshold
    }

    pub fn record_success(&self, service: usize, instance: usize) {
        let counter = &self.counters[service][instance];
        // Read first: on the common path nothing failed, and a store would
        // make every worker contend for the cache line.
        if counter.load(Ordering::Relaxed) != 0 {
            counter.store(0, Ordering::Relaxed);
        }
    }

    fn reset(&self, service: usize, instance: usize) {
        self.counters[service][instance].store(0, Ordering::Relaxed);
    }
}

/// Health of one instance, with the thresholds applied.
#[derive(Debug, Clone)]
pub struct InstanceHealth {
    pub url: String,
    pub healthy: bool,
    pub last_check: Option<SystemTime>,
    pub response_time: Option<Duration>,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub unhealthy: u32,
    pub healthy: u32,
}

impl InstanceHealth {
    pub fn new(url: String) -> Self {
        Self {
            url,
            healthy: true,
            last_check: None,
            response_time: None,
            consecutive_failures: 0,
            consecutive_successes: 0,
            error: None,
        }
    }

    /// Applies one probe; returns true when the instance's health flipped.
    ///
    /// The first probe's result applies at once (SPEC §5): an instance that
    /// fails it is unhealthy right away, so a gateway started while an
    /// upstream is down neither reports it healthy nor sends it traffic for
    /// a whole interval. The thresholds govern every change after that.
    pub fn record_probe(
        &mut self,
        checked_at: SystemTime,
        elapsed: Duration,
        outcome: &Result<(), String>,
        thresholds: Thresholds,
    ) -> bool {
        let first = self.last_check.replace(checked_at).is_none();
        self.response_time = Some(elapsed);
        let was_healthy = self.healthy;
        match outcome {
            Ok(()) => {
                self.consecutive_failures = 0;
                self.consecutive_successes = self.consecutive_successes.saturating_add(1);
                self.error = None;
                if first || self.consecutive_successes >= thresholds.healthy {
                    self.healthy = true;
                }
            }
            Err(reason) => {
                self.consecutive_successes = 0;
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.error = Some(reason.clone());
                if first || self.consecutive_failures >= thresholds.unhealthy {
                    self.healthy = false;
                }
            }
        }
        self.healthy != was_healthy
    }

    /// Passive failures mark the instance unhealthy at once; it returns after
    /// `healthy_threshold` passing probes.
    pub fn record_passive_failure(&mut self, reason: String) -> bool {
        self.consecutive_successes = 0;
        self.error = Some(reason);
        std::mem::replace(&mut self.healthy, false)
    }

    fn report(&self) -> InstanceReport {
        InstanceReport {
            url: self.url.clone(),
            healthy: self.healthy,
            response_time_ms: self.response_time.map(|elapsed| elapsed.as_millis() as u64),
            last_check: self
                .last_check
                .map(|at| humantime::format_rfc3339_seconds(at).to_string()),
            consecutive_failures: self.consecutive_failures,
            error: self.error.clone(),
        }
    }
}

struct ServiceHealth {
    name: String,
    instances: Vec<InstanceHealth>,
}

impl ServiceHealth {
    fn healthy_set(&self) -> Arc<[usize]> {
        self.instances
            .iter()
            .enumerate()
            .filter(|(_, instance)| instance.healthy)
            .map(|(index, _)| index)
            .collect()
    }
}

pub struct RegistryActor {
    services: Vec<ServiceHealth>,
    thresholds: Thresholds,
    passive: Arc<PassiveFailures>,
    balancers: Vec<Recipient<HealthySetChanged>>,
}

impl RegistryActor {
    pub fn new(gateway: &Gateway, health: &HealthSettings, passive: Arc<PassiveFailures>) -> Self {
        let services = gateway
            .services
            .iter()
            .map(|service| ServiceHealth {
                name: service.name.to_string(),
                instances: service
                    .instances
                    .iter()
                    .map(|instance| InstanceHealth::new(instance.url.clone()))
                    .collect(),
            })
            .collect();
        Self {
            services,
            thresholds: Thresholds {
                unhealthy: health.unhealthy_threshold,
                healthy: health.healthy_threshold,
            },
            passive,
            balancers: Vec::new(),
        }
    }

    fn announce(&self, service: usize) {
        let message = HealthySetChanged {
            service,
            healthy: self.services[service].healthy_set(),
        };
        for balancer in &self.balancers {
            balancer.do_send(message.clone());
        }
    }

    fn log_flip(&self, service: usize, instance: usize) {
        let state = &self.services[service].instances[instance];
        crate::metrics::upstream_health(&self.services[service].name, &state.url, state.healthy);
        if state.healthy {
            tracing::info!(service = %self.services[service].name, instance = %state.url, "instance is healthy again");
        } else {
            tracing::warn!(
                service = %self.services[service].name,
                instance = %state.url,
                error = state.error.as_deref().unwrap_or(""),
                "instance marked unhealthy"
            );
        }
    }
}

impl Actor for RegistryActor {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        for service in &self.services {
            for instance in &service.instances {
                crate::metrics::upstream_health(&service.name, &instance.url, instance.healthy);
            }
        }
    }
}

impl Handler<ReportProbe> for RegistryActor {
    type Result = ();

    fn handle(&mut self, msg: ReportProbe, _: &mut Context<Self>) {
        let thresholds = self.thresholds;
        let Some(service) = self.services.get_mut(msg.service) else {
            return;
        };
        let Some(state) = service.instances.get_mut(msg.instance) else {
            return;
        };
        crate::metrics::probe_completed(&service.name, &state.url, msg.elapsed);
        if state.record_probe(msg.checked_at, msg.elapsed, &msg.outcome, thresholds) {
            if state.healthy {
                self.passive.reset(msg.service, msg.instance);
            }
            self.log_flip(msg.service, msg.instance);
            self.announce(msg.service);
        }
    }
}

impl Handler<ReportPassiveFailure> for RegistryActor {
    type Result = ();

    fn handle(&mut self, msg: ReportPassiveFailure, _: &mut Context<Self>) {
        let Some(state) = self
            .services
            .get_mut(msg.service)
            .and_then(|service| service.instances.get_mut(msg.instance))
        else {
            return;
        };
        let was_healthy = state.record_passive_failure(format!("passive: {}", msg.reason));
        // Until a probe passes, the counter keeps counting but the threshold
        // is not crossed again; reset it so the next streak is detected.
        self.passive.reset(msg.service, msg.instance);
        if was_healthy {
            self.log_flip(msg.service, msg.instance);
            self.announce(msg.service);
        }
    }
}

impl Handler<SubscribeBalancer> for RegistryActor {
    type Result = ();

    fn handle(&mut self, msg: SubscribeBalancer, _: &mut Context<Self>) {
        for (index, service) in self.services.iter().enumerate() {
            msg.0.do_send(HealthySetChanged {
                service: index,
                healthy: service.healthy_set(),
            });
        }
        self.balancers.push(msg.0);
    }
}

impl Handler<GetHealthReport> for RegistryActor {
    type Result = HealthReport;

    fn handle(&mut self, _: GetHealthReport, _: &mut Context<Self>) -> HealthReport {
        let mut services = BTreeMap::new();
        let mut with_healthy = 0;
        for service in &self.services {
            let any_healthy = service.instances.iter().any(|instance| instance.healthy);
            with_healthy += usize::from(any_healthy);
            services.insert(
                service.name.clone(),
                ServiceReport {
                    status: if any_healthy { "healthy" } else { "unhealthy" },
                    instances: service.instances.iter().map(InstanceHealth::report).collect(),
                },
            );
        }
        let status = if with_healthy == self.services.len() {
            "ok"
        } else if with_healthy == 0 {
            "down"
        } else {
            "degraded"
        };
        HealthReport { status, services }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THRESHOLDS: Thresholds = Thresholds {
        unhealthy: 2,
        healthy: 3,
    };

    /// Applies one probe taken now.
    fn probe(instance: &mut InstanceHealth, outcome: Result<(), &str>, thresholds: Thresholds) -> bool {
        let outcome = outcome.map_err(str::to_owned);
        instance.record_probe(SystemTime::now(), Duration::from_millis(3), &outcome, thresholds)
    }

    #[test]
    fn an_instance_is_healthy_and_unchecked_until_its_first_probe() {
        let instance = InstanceHealth::new("http://127.0.0.1:1".into());
        let report = instance.report();
        assert!(report.healthy);
        assert_eq!((report.last_check, report.response_time_ms), (None, None));
        assert_eq!((report.consecutive_failures, report.error), (0, None));
    }

    #[test]
    fn a_failing_first_probe_marks_the_instance_unhealthy_at_once() {
        let thresholds = Thresholds {
            unhealthy: 3,
            healthy: 2,
        };
        let mut instance = InstanceHealth::new("http://127.0.0.1:1".into());
        assert!(probe(&mut instance, Err("connect: refused"), thresholds), "flips");
        assert!(!instance.healthy);
        let report = instance.report();
        assert_eq!(report.consecutive_failures, 1);
        assert_eq!(report.error.as_deref(), Some("connect: refused"));
        assert!(report.last_check.is_some());
        assert_eq!(report.response_time_ms, Some(3));

        // From the second probe on, the thresholds decide.
        assert!(!probe(&mut instance, Ok(()), thresholds), "one pass of two");
        assert!(!instance.healthy);
        assert!(probe(&mut instance, Ok(()), thresholds), "the second pass flips back");
        assert!(instance.healthy);
    }

    #[test]
    fn after_a_passing_first_probe_failures_need_the_threshold() {
        let thresholds = Thresholds {
            unhealthy: 3,
            healthy: 1,
        };
        let mut instance = InstanceHealth::new("http://127.0.0.1:1".into());
        assert!(!probe(&mut instance, Ok(()), thresholds), "stays healthy");
        assert!(instance.healthy);
        assert_eq!(instance.error, None);
        assert!(!probe(&mut instance, Err("status 500"), thresholds));
        assert!(!probe(&mut instance, Err("status 500"), thresholds));
        assert!(instance.healthy, "two failures of three");
        assert_eq!(instance.consecutive_failures, 2);
        assert!(probe(&mut instance, Err("status 500"), thresholds), "the third flips");
        assert!(!instance.healthy);
    }

    #[test]
    fn health_flips_only_after_consecutive_results() {
        let mut instance = InstanceHealth::new("http://127.0.0.1:1".into());
        assert!(!probe(&mut instance, Ok(()), THRESHOLDS), "the first probe passes");
        assert!(
            !probe(&mut instance, Err("refused"), THRESHOLDS),
            "one failure is not enough"
        );
        assert!(instance.healthy);
        assert!(!probe(&mut instance, Ok(()), THRESHOLDS), "a pass resets the streak");
        assert!(!probe(&mut instance, Err("refused"), THRESHOLDS));
        assert!(
            probe(&mut instance, Err("refused"), THRESHOLDS),
            "second failure in a row flips"
        );
        assert!(!instance.healthy);
        assert_eq!(instance.consecutive_failures, 2);
        assert_eq!(instance.error.as_deref(), Some("refused"));
        assert!(!probe(&mut instance, Ok(()), THRESHOLDS));
        assert!(!probe(&mut instance, Ok(()), THRESHOLDS));
        assert!(probe(&mut instance, Ok(()), THRESHOLDS), "third pass flips back");
        assert!(instance.healthy);
        assert_eq!(instance.error, None);
    }

    #[test]
    fn passive_failure_marks_unhealthy_until_probes_pass() {
        let mut instance = InstanceHealth::new("http://127.0.0.1:1".into());
        assert!(instance.record_passive_failure("connect".into()));
        assert!(!instance.healthy);
        assert!(!instance.record_passive_failure("connect".into()), "already unhealthy");
        let one = Thresholds {
            unhealthy: 2,
            healthy: 1,
        };
        assert!(probe(&mut instance, Ok(()), one));
        assert!(instance.healthy);
    }
}
