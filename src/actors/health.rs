//! `HealthChecker`: probes every instance's health path once at start-up and
//! then every `health.interval_ms`, all instances concurrently, each bounded
//! by `health.timeout_ms`. It keeps no health state: each result goes to the
//! `RegistryActor`, which applies the first result at once and the
//! thresholds after it. On a reload the registry sends the new [`ProbeSet`];
//! instances it names as new are probed at once.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::{Actor, ActorFutureExt, Addr, AsyncContext, Context, Handler, Message, SpawnHandle, WrapFuture};
use futures_util::StreamExt;

use super::registry::{RegistryActor, ReportProbe};

/// Probe bodies are read (so the connection can be reused) up to this size.
const MAX_PROBE_BODY: usize = 64 * 1024;

/// One instance to probe, known by its service's name and its URL.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    pub service: Arc<str>,
    pub url: Arc<str>,
    /// The instance URL with the service's health path.
    pub probe_url: String,
}

/// Everything to probe, and how; replaces the previous set.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ProbeSet {
    pub targets: Vec<ProbeTarget>,
    pub interval: Duration,
    pub timeout: Duration,
    /// TLS for `https://` instances, as the proxy's.
    pub tls: Arc<rustls::ClientConfig>,
    /// Instances (service, URL) to probe now rather than at the next tick.
    pub probe_now: Vec<(Arc<str>, Arc<str>)>,
}

struct Probed {
    target: ProbeTarget,
    /// A probe still running is not started again.
    in_flight: bool,
}

pub struct HealthChecker {
    registry: Addr<RegistryActor>,
    targets: Vec<Probed>,
    interval: Duration,
    timeout: Duration,
    client: awc::Client,
    ticker: Option<SpawnHandle>,
}

fn probe_client(timeout: Duration, tls: Arc<rustls::ClientConfig>) -> awc::Client {
    awc::Client::builder()
        .disable_redirects()
        .timeout(timeout)
        .connector(awc::Connector::new().timeout(timeout).rustls_0_23(tls))
        .finish()
}

impl HealthChecker {
    pub fn new(set: ProbeSet, registry: Addr<RegistryActor>) -> Self {
        Self {
            registry,
            targets: set
                .targets
                .into_iter()
                .map(|target| Probed {
                    target,
                    in_flight: false,
                })
                .collect(),
            interval: set.interval,
            timeout: set.timeout,
            client: probe_client(set.timeout, set.tls),
            ticker: None,
        }
    }

    fn probe_all(&mut self, ctx: &mut Context<Self>) {
        for index in 0..self.targets.len() {
            self.probe(index, ctx);
        }
    }

    /// Starts a probe of one instance unless its previous probe is still
    /// running; the result goes to the registry as soon as it is known, so a
    /// hanging instance never delays the verdict on the others.
    fn probe(&mut self, index: usize, ctx: &mut Context<Self>) {
        let probed = &mut self.targets[index];
        if probed.in_flight {
            return;
        }
        probed.in_flight = true;
        let request = self.client.get(&probed.target.probe_url).timeout(self.timeout);
        let (service, url, timeout) = (probed.target.service.clone(), probed.target.url.clone(), self.timeout);
        let probe = async move {
            let checked_at = SystemTime::now();
            let started = Instant::now();
            // The whole probe, body included, is bounded by the timeout.
            let outcome = actix_rt::time::timeout(timeout, probe(request))
                .await
                .unwrap_or_else(|_| Err("timeout".to_owned()));
            ReportProbe {
                service,
                url,
                checked_at,
                elapsed: started.elapsed(),
                outcome,
            }
        };
        ctx.spawn(probe.into_actor(self).map(|report, checker, _| {
            // Found again by identity: a reload may have reordered the set.
            if let Some(probed) = checker.find(&report.service, &report.url) {
                probed.in_flight = false;
            }
            checker.registry.do_send(report);
        }));
    }

    fn find(&mut self, service: &str, url: &str) -> Option<&mut Probed> {
        self.targets
            .iter_mut()
            .find(|probed| &*probed.target.service == service && &*probed.target.url == url)
    }

    fn start_ticking(&mut self, ctx: &mut Context<Self>) {
        if let Some(ticker) = self.ticker.take() {
            ctx.cancel_future(ticker);
        }
        self.ticker = Some(ctx.run_interval(self.interval, Self::probe_all));
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
        self.start_ticking(ctx);
    }
}

impl Handler<ProbeSet> for HealthChecker {
    type Result = ();

    fn handle(&mut self, set: ProbeSet, ctx: &mut Context<Self>) {
        // A probe running for an instance that stays keeps running (and is
        // not started twice); one for a removed instance reports to nothing.
        let mut previous = std::mem::take(&mut self.targets);
        self.targets = set
            .targets
            .into_iter()
            .map(|target| {
                let in_flight = previous
                    .iter()
                    .position(|probed| probed.target.service == target.service && probed.target.url == target.url)
                    .is_some_and(|index| previous.swap_remove(index).in_flight);
                Probed { target, in_flight }
            })
            .collect();
        // A new client each time: the TLS configuration may have changed.
        self.timeout = set.timeout;
        self.client = probe_client(set.timeout, set.tls);
        if set.interval != self.interval {
            self.interval = set.interval;
            self.start_ticking(ctx);
        }
        for (service, url) in &set.probe_now {
            if let Some(index) = self
                .targets
                .iter()
                .position(|probed| probed.target.service == *service && probed.target.url == *url)
            {
                self.probe(index, ctx);
            }
        }
    }
}
