//! `RegistryActor`: owns every service's instances, their health, and the
//! configuration in force.
//!
//! Health changes arrive from two sides: the `HealthChecker`'s active probes
//! (`ReportProbe`) and the proxy's passive observations (`ReportPassiveFailure`,
//! sent once an instance has failed `health.passive_failures` requests in a
//! row). A flip is decided here only, logged once, and pushed to every
//! worker's balancer as the service's new healthy set. An instance starts
//! healthy, and its first probe's result applies at once; the thresholds
//! govern every change after that.
//!
//! A reload ([`Reconfigure`]) reconciles by identity, never by position: an
//! instance is its service's name and its URL, so one whose URL is unchanged
//! keeps its health, its failure streak and (in each worker) its pooled
//! connections, and a service keeps its round-robin cursor. The registry
//! then tells the health checker the new probe set and pushes the new
//! [`Deployment`] to every worker's balancer, which swaps it in on its own
//! thread; the reload is answered once every worker has.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::{
    Actor, ActorFutureExt, Addr, AsyncContext, AtomicResponse, Context, Handler, Message, MessageResponse, WrapFuture,
};
use serde::Serialize;

use super::balancer::{BalancerActor, Deploy, HealthySetChanged};
use super::health::{HealthChecker, ProbeSet, ProbeTarget};
use crate::auth::Verifier;
use crate::gateway::{Gateway, Runtime};
use crate::settings::{HealthSettings, RateLimitSettings, UpstreamSettings};

/// Result of one active probe of one instance.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ReportProbe {
    pub service: Arc<str>,
    pub url: Arc<str>,
    pub checked_at: SystemTime,
    pub elapsed: Duration,
    /// `Err` carries a short reason shown in `/health`.
    pub outcome: Result<(), String>,
}

/// An instance failed `passive_failures` proxied requests in a row.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ReportPassiveFailure {
    pub service: Arc<str>,
    pub url: String,
    pub reason: String,
}

/// A worker's balancer asks for the configuration in force and to be told
/// about every change; it is sent the current [`Deploy`] at once.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SubscribeBalancer(pub Addr<BalancerActor>);

/// A validated, compiled configuration to put in force. Answered with its
/// generation once every worker serves it.
#[derive(Message)]
#[rtype(result = "u64")]
pub struct Reconfigure {
    pub runtime: Runtime,
    pub health: HealthSettings,
    pub upstream: UpstreamSettings,
    pub rate_limit: RateLimitSettings,
}

/// A reload failed; the configuration in force stays.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ReloadFailed(pub String);

/// The body of `GET /health`.
#[derive(Debug, Message)]
#[rtype(result = "HealthReport")]
pub struct GetHealthReport;

#[derive(Debug, Clone, Serialize, MessageResponse)]
pub struct HealthReport {
    /// `ok`, `degraded` or `down`.
    pub status: &'static str,
    pub services: BTreeMap<String, ServiceReport>,
    pub config: ConfigReport,
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

/// `/health`'s `config` block (SPEC §7).
#[derive(Debug, Clone, Serialize)]
pub struct ConfigReport {
    /// 1 at start-up, +1 per successful reload.
    pub generation: u64,
    pub loaded_at: String,
    /// The latest failed reload's message, until a later one succeeds.
    pub last_reload_error: Option<String>,
}

/// One configuration generation as every worker builds its view of it: the
/// compiled configuration, plus the state that outlives generations (each
/// service's cursor, each instance's failure streak), placed beside the
/// service and instance it belongs to. `services[s]` is `gateway.services[s]`.
pub struct Deployment {
    pub generation: u64,
    pub gateway: Arc<Gateway>,
    /// `None` when no route needs auth.
    pub verifier: Option<Arc<Verifier>>,
    pub upstream: UpstreamSettings,
    pub rate_limit: RateLimitSettings,
    pub passive_threshold: u32,
    pub services: Vec<DeployedService>,
}

pub struct DeployedService {
    /// Shared by every worker, so the rotation is the process's.
    pub cursor: Arc<AtomicUsize>,
    /// `instances[i]` is the service's instance `i`.
    pub instances: Vec<Arc<PassiveFailures>>,
}

/// Consecutive proxying failures of one instance, shared by every worker so
/// the count is the process's, not one worker's. Only the crossing of the
/// threshold is sent to the registry; successes are a plain atomic store.
#[derive(Debug, Default)]
pub struct PassiveFailures {
    count: AtomicU32,
}

impl PassiveFailures {
    /// True exactly once per streak: when this failure reaches the threshold.
    pub fn record_failure(&self, threshold: u32) -> bool {
        self.count.fetch_add(1, Ordering::Relaxed) + 1 == threshold
    }

    pub fn record_success(&self) {
        // Read first: on the common path nothing failed, and a store would
        // make every worker contend for the cache line.
        if self.count.load(Ordering::Relaxed) != 0 {
            self.count.store(0, Ordering::Relaxed);
        }
    }

    fn reset(&self) {
        self.count.store(0, Ordering::Relaxed);
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

/// What the registry keeps of one instance across reloads.
struct InstanceState {
    health: InstanceHealth,
    failures: Arc<PassiveFailures>,
}

struct ServiceState {
    name: Arc<str>,
    cursor: Arc<AtomicUsize>,
    /// In the order of the deployment's instances.
    instances: Vec<InstanceState>,
}

impl ServiceState {
    fn healthy_set(&self) -> Arc<[usize]> {
        self.instances
            .iter()
            .enumerate()
            .filter(|(_, instance)| instance.health.healthy)
            .map(|(index, _)| index)
            .collect()
    }

    fn position(&self, url: &str) -> Option<usize> {
        self.instances.iter().position(|instance| instance.health.url == url)
    }
}

pub struct RegistryActor {
    deployment: Arc<Deployment>,
    loaded_at: SystemTime,
    last_reload_error: Option<String>,
    /// In the order of the deployment's services.
    services: Vec<ServiceState>,
    thresholds: Thresholds,
    balancers: Vec<Addr<BalancerActor>>,
    checker: Option<Addr<HealthChecker>>,
    health: HealthSettings,
}

impl RegistryActor {
    /// Starts the registry and its health checker on the current arbiter with
    /// the start-up configuration (generation 1).
    pub fn start(
        runtime: Runtime,
        health: HealthSettings,
        upstream: UpstreamSettings,
        rate_limit: RateLimitSettings,
    ) -> (Addr<Self>, Arc<Deployment>) {
        let mut registry = Self {
            deployment: Arc::new(Deployment {
                generation: 0,
                gateway: runtime.gateway.clone(),
                verifier: None,
                upstream: upstream.clone(),
                rate_limit: rate_limit.clone(),
                passive_threshold: health.passive_failures,
                services: Vec::new(),
            }),
            loaded_at: SystemTime::now(),
            last_reload_error: None,
            services: Vec::new(),
            thresholds: Thresholds::of(&health),
            balancers: Vec::new(),
            checker: None,
            health: health.clone(),
        };
        registry.reconcile(Reconfigure {
            runtime,
            health,
            upstream,
            rate_limit,
        });
        let deployment = registry.deployment.clone();
        let address = Self::create(|ctx| {
            let checker = HealthChecker::new(registry.probe_set(), ctx.address()).start();
            registry.checker = Some(checker);
            registry
        });
        (address, deployment)
    }

    /// Carries health, failure streaks and cursors over to `next` by service
    /// name and instance URL, and makes it the deployment in force. Returns
    /// the instances that are new (service, URL), to be probed at once.
    fn reconcile(&mut self, next: Reconfigure) -> Vec<(Arc<str>, Arc<str>)> {
        let Reconfigure {
            runtime,
            health,
            upstream,
            rate_limit,
        } = next;
        let mut previous: Vec<ServiceState> = std::mem::take(&mut self.services);
        let mut added = Vec::new();
        let mut services = Vec::with_capacity(runtime.gateway.services.len());
        for service in &runtime.gateway.services {
            let mut kept = previous
                .iter()
                .position(|state| state.name == service.name)
                .map(|index| previous.swap_remove(index));
            let instances = service
                .instances
                .iter()
                .map(|instance| {
                    let carried = kept.as_mut().and_then(|state| {
                        let index = state.position(&instance.url)?;
                        Some(state.instances.swap_remove(index))
                    });
                    carried.unwrap_or_else(|| {
                        added.push((service.name.clone(), Arc::from(instance.url.as_str())));
                        crate::metrics::upstream_health(&service.name, &instance.url, true);
                        InstanceState {
                            health: InstanceHealth::new(instance.url.clone()),
                            failures: Arc::default(),
                        }
                    })
                })
                .collect();
            services.push(ServiceState {
                name: service.name.clone(),
                cursor: kept.map_or_else(Arc::default, |state| state.cursor),
                instances,
            });
        }
        for removed in previous
            .iter()
            .flat_map(|service| service.instances.iter().map(move |i| (service, i)))
        {
            tracing::info!(service = %removed.0.name, instance = %removed.1.health.url, "instance removed");
        }
        self.services = services;
        self.thresholds = Thresholds::of(&health);
        self.deployment = Arc::new(Deployment {
            generation: self.deployment.generation + 1,
            gateway: runtime.gateway,
            verifier: runtime.verifier,
            upstream,
            rate_limit,
            passive_threshold: health.passive_failures,
            services: self
                .services
                .iter()
                .map(|service| DeployedService {
                    cursor: service.cursor.clone(),
                    instances: service
                        .instances
                        .iter()
                        .map(|instance| instance.failures.clone())
                        .collect(),
                })
                .collect(),
        });
        self.health = health;
        self.loaded_at = SystemTime::now();
        self.last_reload_error = None;
        added
    }

    fn probe_set(&self) -> ProbeSet {
        let targets = self
            .deployment
            .gateway
            .services
            .iter()
            .flat_map(|service| {
                service.instances.iter().map(|instance| ProbeTarget {
                    service: service.name.clone(),
                    url: Arc::from(instance.url.as_str()),
                    probe_url: format!(
                        "{}://{}{}{}",
                        instance.scheme, instance.authority, instance.base_path, service.health_path
                    ),
                })
            })
            .collect();
        ProbeSet {
            targets,
            interval: Duration::from_millis(self.health.interval_ms),
            timeout: Duration::from_millis(self.health.timeout_ms),
            tls: self.deployment.gateway.upstream_tls.clone(),
            probe_now: Vec::new(),
        }
    }

    fn deploy_message(&self) -> Deploy {
        Deploy {
            deployment: self.deployment.clone(),
            healthy: self.services.iter().map(ServiceState::healthy_set).collect(),
        }
    }

    fn find(&mut self, service: &str, url: &str) -> Option<(usize, usize)> {
        let service_index = self.services.iter().position(|state| &*state.name == service)?;
        let instance_index = self.services[service_index].position(url)?;
        Some((service_index, instance_index))
    }

    fn announce(&self, service: usize) {
        let message = HealthySetChanged {
            generation: self.deployment.generation,
            service,
            healthy: self.services[service].healthy_set(),
        };
        for balancer in &self.balancers {
            balancer.do_send(message.clone());
        }
    }

    fn log_flip(&self, service: usize, instance: usize) {
        let name = &self.services[service].name;
        let state = &self.services[service].instances[instance].health;
        crate::metrics::upstream_health(name, &state.url, state.healthy);
        if state.healthy {
            tracing::info!(service = %name, instance = %state.url, "instance is healthy again");
        } else {
            tracing::warn!(
                service = %name,
                instance = %state.url,
                error = state.error.as_deref().unwrap_or(""),
                "instance marked unhealthy"
            );
        }
    }
}

impl Thresholds {
    fn of(health: &HealthSettings) -> Self {
        Self {
            unhealthy: health.unhealthy_threshold,
            healthy: health.healthy_threshold,
        }
    }
}

impl Actor for RegistryActor {
    type Context = Context<Self>;
}

impl Handler<ReportProbe> for RegistryActor {
    type Result = ();

    fn handle(&mut self, msg: ReportProbe, _: &mut Context<Self>) {
        // A probe of an instance removed meanwhile finds nothing.
        let Some((service, instance)) = self.find(&msg.service, &msg.url) else {
            return;
        };
        let thresholds = self.thresholds;
        let state = &mut self.services[service].instances[instance];
        crate::metrics::probe_completed(&msg.service, &msg.url, msg.elapsed);
        if state
            .health
            .record_probe(msg.checked_at, msg.elapsed, &msg.outcome, thresholds)
        {
            if state.health.healthy {
                state.failures.reset();
            }
            self.log_flip(service, instance);
            self.announce(service);
        }
    }
}

impl Handler<ReportPassiveFailure> for RegistryActor {
    type Result = ();

    fn handle(&mut self, msg: ReportPassiveFailure, _: &mut Context<Self>) {
        let Some((service, instance)) = self.find(&msg.service, &msg.url) else {
            return;
        };
        let state = &mut self.services[service].instances[instance];
        let was_healthy = state.health.record_passive_failure(format!("passive: {}", msg.reason));
        // Until a probe passes, the counter keeps counting but the threshold
        // is not crossed again; reset it so the next streak is detected.
        state.failures.reset();
        if was_healthy {
            self.log_flip(service, instance);
            self.announce(service);
        }
    }
}

impl Handler<SubscribeBalancer> for RegistryActor {
    type Result = ();

    fn handle(&mut self, msg: SubscribeBalancer, _: &mut Context<Self>) {
        msg.0.do_send(self.deploy_message());
        self.balancers.push(msg.0);
    }
}

impl Handler<Reconfigure> for RegistryActor {
    /// Atomic: no probe result or other reload is applied while the workers
    /// are swapping, so what they are sent stays the registry's view.
    type Result = AtomicResponse<Self, u64>;

    fn handle(&mut self, msg: Reconfigure, _: &mut Context<Self>) -> Self::Result {
        let added = self.reconcile(msg);
        let mut probe_set = self.probe_set();
        probe_set.probe_now = added;
        if let Some(checker) = &self.checker {
            checker.do_send(probe_set);
        }
        let deploy = self.deploy_message();
        let generation = self.deployment.generation;
        let swaps: Vec<_> = self
            .balancers
            .iter()
            .map(|balancer| balancer.send(deploy.clone()))
            .collect();
        AtomicResponse::new(Box::pin(
            async move {
                // A worker that has stopped (the server is shutting down)
                // has nothing left to swap.
                futures_util::future::join_all(swaps).await;
            }
            .into_actor(self)
            .map(move |(), registry, _| {
                registry.balancers.retain(|balancer| balancer.connected());
                crate::metrics::config_generation(generation);
                generation
            }),
        ))
    }
}

impl Handler<ReloadFailed> for RegistryActor {
    type Result = ();

    fn handle(&mut self, msg: ReloadFailed, _: &mut Context<Self>) {
        self.last_reload_error = Some(msg.0);
    }
}

impl Handler<GetHealthReport> for RegistryActor {
    type Result = HealthReport;

    fn handle(&mut self, _: GetHealthReport, _: &mut Context<Self>) -> HealthReport {
        let mut services = BTreeMap::new();
        let mut with_healthy = 0;
        for service in &self.services {
            let any_healthy = service.instances.iter().any(|instance| instance.health.healthy);
            with_healthy += usize::from(any_healthy);
            services.insert(
                service.name.to_string(),
                ServiceReport {
                    status: if any_healthy { "healthy" } else { "unhealthy" },
                    instances: service
                        .instances
                        .iter()
                        .map(|instance| instance.health.report())
                        .collect(),
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
        HealthReport {
            status,
            services,
            config: ConfigReport {
                generation: self.deployment.generation,
                loaded_at: humantime::format_rfc3339_seconds(self.loaded_at).to_string(),
                last_reload_error: self.last_reload_error.clone(),
            },
        }
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
