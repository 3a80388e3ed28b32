//! Prometheus metrics (SPEC §5 `/metrics`), recorded through the `metrics`
//! facade and rendered by `metrics-exporter-prometheus`.
//!
//! The recorder is process-global and installed once; every gateway built in
//! the process records into it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use actix_web::http::Method;

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Request duration buckets, in seconds: from sub-millisecond proxying to
/// the default 30 s upstream timeout.
const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0,
];

/// Installs the recorder (once per process) and returns its handle.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&DURATION_BUCKETS)
            .expect("bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        // `GATEHOUSE_METRICS=off` records nothing (the benchmark measures
        // the cost of metrics with it). Another recorder may also already be
        // installed by an embedding program: then this handle renders nothing.
        if std::env::var("GATEHOUSE_METRICS").as_deref() != Ok("off") {
            let _ = metrics::set_global_recorder(recorder);
        }
        handle
    })
}

/// The text exposition; also runs the exporter's upkeep (histogram draining).
pub fn render() -> String {
    let handle = install();
    handle.run_upkeep();
    handle.render()
}

/// Histogram upkeep period, so metrics memory stays flat between scrapes.
const UPKEEP_PERIOD: Duration = Duration::from_secs(5);

/// Drains histograms so their memory stays bounded between scrapes.
pub fn run_upkeep() {
    install().run_upkeep();
}

/// Runs [`run_upkeep`] every few seconds on the current arbiter, for as long
/// as it runs.
pub fn spawn_upkeep() {
    actix_rt::spawn(async {
        let mut upkeep = actix_rt::time::interval(UPKEEP_PERIOD);
        loop {
            upkeep.tick().await;
            run_upkeep();
        }
    });
}

/// The `method` label: the standard methods by name, anything a client
/// invents as `OTHER`, so clients cannot grow the series without bound.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

/// Route key, method label, status.
type SeriesKey = (usize, &'static str, u16);

thread_local! {
    /// Each worker's handles per (route, method, status): registering a
    /// labelled series costs label allocations and a registry lookup, so it
    /// happens once per series and worker, not once per request. Bounded by
    /// routes × 10 method labels × statuses seen.
    static REQUEST_SERIES: RefCell<HashMap<SeriesKey, (Counter, Histogram)>> = RefCell::new(HashMap::new());
}

/// Counts one finished request. `route_key` identifies `route` cheaply (an
/// address or a small constant); `route` is its label.
pub fn request_completed(route_key: usize, route: &str, method: &Method, status: u16, elapsed: Duration) {
    let method = method_label(method);
    REQUEST_SERIES.with(|series| {
        let mut series = series.borrow_mut();
        let (requests, duration) = series.entry((route_key, method, status)).or_insert_with(|| {
            (
                metrics::counter!(
                    "gatehouse_requests_total",
                    "route" => route.to_owned(),
                    "method" => method,
                    "status" => status.to_string()
                ),
                metrics::histogram!("gatehouse_request_duration_seconds", "route" => route.to_owned()),
            )
        });
        requests.increment(1);
        duration.record(elapsed.as_secs_f64());
    });
}

pub fn upstream_health(service: &str, instance: &str, healthy: bool) {
    metrics::gauge!("gatehouse_upstream_healthy", "service" => service.to_owned(), "instance" => instance.to_owned())
        .set(if healthy { 1.0 } else { 0.0 });
}

pub fn probe_completed(service: &str, instance: &str, elapsed: Duration) {
    metrics::histogram!(
        "gatehouse_upstream_probe_duration_seconds",
        "service" => service.to_owned(),
        "instance" => instance.to_owned()
    )
    .record(elapsed.as_secs_f64());
}

pub fn rate_limited(policy: &str) {
    metrics::counter!("gatehouse_rate_limited_total", "policy" => policy.to_owned()).increment(1);
}

pub fn rate_limit_backend_error() {
    metrics::counter!("gatehouse_rate_limit_backend_errors_total").increment(1);
}

pub fn upstream_error(service: &str, kind: &'static str) {
    metrics::counter!("gatehouse_upstream_errors_total", "service" => service.to_owned(), "kind" => kind).increment(1);
}

/// Empties this worker's request-series handles. Called when the worker
/// swaps in a new configuration: the handles are keyed by route address,
/// and a new route may later be allocated where a dropped one was.
pub fn forget_request_series() {
    REQUEST_SERIES.with(|series| series.borrow_mut().clear());
}

/// A WebSocket tunnel opened on `route`.
pub fn tunnel_opened(route: &str) {
    metrics::gauge!("gatehouse_websocket_tunnels_open", "route" => route.to_owned()).increment(1.0);
}

/// A tunnel on `route` ended, `how` as [`crate::websocket`] labels it.
pub fn tunnel_closed(route: &str, how: &'static str) {
    metrics::gauge!("gatehouse_websocket_tunnels_open", "route" => route.to_owned()).decrement(1.0);
    metrics::counter!("gatehouse_websocket_tunnels_total", "route" => route.to_owned(), "ended" => how).increment(1);
}

/// One fetch of the identity provider's key set, `success` or `failure`.
pub fn jwks_fetch(result: &'static str) {
    metrics::counter!("gatehouse_jwks_fetches_total", "result" => result).increment(1);
}

pub fn config_generation(generation: u64) {
    metrics::gauge!("gatehouse_config_generation").set(generation as f64);
}

/// One reload attempt, `success` or `failure`.
pub fn config_reload(result: &'static str) {
    metrics::counter!("gatehouse_config_reloads_total", "result" => result).increment(1);
}
