//! `HealthChecker`: probes every instance's health path once at start-up and
//! then every `health.interval_ms`, all instances concurrently, each bounded
//! by `health.timeout_ms`. It keeps no health state: each result goes to the
//! `RegistryActor`, which applies the first result at once and the
//! thresholds after it.

use std::time::{Duration, Instant, SystemTime};

use actix::{Actor, ActorFutureExt, Addr, AsyncContext, Context, WrapFuture};
use futures_util::StreamExt;

use super::registry::{RegistryActor, ReportProbe};
use crate::gateway::Gateway;
use crate::settings::HealthSettings;

/// Probe bodies are read (so the connection can be reused) up to this size.
const MAX_PROBE_BODY: usize = 64 * 1024;

struct ProbeTarget {
    service: usize,
    instance: usize,
    url: String,
    /// A probe still running is not started again.
    in_flight: bool,
}

pub struct HealthChecker {
    registry: Addr<RegistryActor>,
    targets: Vec<ProbeTarget>,
    interval: Duration,
    timeout: Duration,
    client: awc::Client,
}

impl HealthChecker {
    pub fn new(gateway: &Gateway, health: &HealthSettings, registry: Addr<RegistryActor>) -> Self {
        let targets = gateway
            .services
            .iter()
            .enumerate()
            .flat_map(|(service_index, service)| {
                service
                    .instances
                    .iter()
                    .enumerate()
                    .map(move |(instance_index, instance)| ProbeTarget {
                        service: service_index,
                        instance: instance_index,
                        url: format!(
                            "{}://{}{}{}",
                            instance.scheme, instance.authority, instance.base_path, service.health_path
                        ),
                        in_flight: false,
                    })
            })
            .collect();
        let timeout = Duration::from_millis(health.timeout_ms);
        let client = awc::Client::builder()
            .disable_redirects()
            .timeout(timeout)
            .connector(awc::Connector::new().timeout(timeout))
            .finish();
        Self {
            registry,
            targets,
            interval: Duration::from_millis(health.interval_ms),
            timeout,
            client,
        }
    }

    /// Starts a probe of every instance whose previous probe has finished;
    /// each result goes to the registry as soon as it is known, so a hanging
    /// instance never delays the verdict on the others.
    fn probe_all(&mut self, ctx: &mut Context<Self>) {
        for index in 0..self.targets.len() {
            let target = &mut self.targets[index];
            if target.in_flight {
                continue;
            }
            target.in_flight = true;
            let request = self.client.get(&target.url).timeout(self.timeout);
            let (service, instance, timeout) = (target.service, target.instance, self.timeout);
            let probe = async move {
                let checked_at = SystemTime::now();
                let started = Instant::now();
                // The whole probe, body included, is bounded by the timeout.
                let outcome = actix_rt::time::timeout(timeout, probe(request))
                    .await
                    .unwrap_or_else(|_| Err("timeout".to_owned()));
                ReportProbe {
                    service,
                    instance,
                    checked_at,
                    elapsed: started.elapsed(),
                    outcome,
                }
            };
            ctx.spawn(probe.into_actor(self).map(move |report, checker, _| {
                checker.targets[index].in_flight = false;
                checker.registry.do_send(report);
            }));
        }
    }
}

/// A probe passes on any 2xx answer (as the seed's `response.ok`).
async fn probe(request: awc::ClientRequest) -> Result<(), String> {
    let mut response = request.send().await.map_err(|err| match err {
        awc::error::SendRequestError::Timeout => "timeout".to_owned(),
        awc::error::SendRequestError::Connect(err) => format!("connect: {err}"),
        other => other.to_string(),
    })?;
    let mut drained = 0;
    while let Some(Ok(chunk)) = response.next().await {
        drained += chunk.len();
        if drained > MAX_PROBE_BODY {
            break;
        }
    }
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("status {}", response.status().as_u16()))
    }
}

impl Actor for HealthChecker {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.probe_all(ctx);
        ctx.run_interval(self.interval, Self::probe_all);
    }
}
