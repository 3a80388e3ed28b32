//! Logging: a `tracing` subscriber (text, or JSON lines with
//! `GATEHOUSE_LOG_FORMAT=json`) filtered by `GATEHOUSE_LOG` or `RUST_LOG`,
//! and the per-request root span for `tracing-actix-web`.
//!
//! Every request gets one span carrying its request id, route and instance,
//! so every line logged while serving it names the request, and one
//! `request completed` line with status and latency.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::{Error, HttpMessage};
use std::sync::Arc;

use tracing::Span;
use tracing_actix_web::RootSpanBuilder;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

use crate::middleware::request_id::RequestId;
use crate::middleware::route_match::{Routed, Target};

/// Lines queued for the writer thread. The queue is allocated up front (32
/// bytes a line); tracing-appender's default of 128k lines held 4 MiB.
const LOG_QUEUE_LINES: usize = 16 * 1024;

/// Installs the global subscriber; logs go to stderr so that commands such as
/// `gatehouse token` keep stdout for their output.
///
/// Lines are written by a dedicated thread through a buffer that it flushes
/// whenever it has drained what was logged: under load many lines share one
/// `write`, and the HTTP workers never wait on stderr. Nothing is dropped: a
/// worker only blocks when [`LOG_QUEUE_LINES`] lines are waiting. Keep the
/// returned guard for the life of the process: dropping it flushes what is
/// left (waiting up to a second for the writer thread to drain).
pub fn init() -> WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("gatehouse-log")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let filter = std::env::var("GATEHOUSE_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|directives| EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let json = std::env::var("GATEHOUSE_LOG_FORMAT").is_ok_and(|format| format.eq_ignore_ascii_case("json"));
    // Colours only on a terminal: piped or collected logs stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    let _ = if json {
        builder.json().with_current_span(true).with_span_list(false).try_init()
    } else {
        builder.try_init()
    };
    guard
}

/// The root span of each request.
pub struct GatewayRootSpan;

impl RootSpanBuilder for GatewayRootSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        let extensions = request.extensions();
        let request_id = extensions.get::<RequestId>().map(RequestId::as_str).unwrap_or("");
        tracing::info_span!(
            "request",
            request_id = %request_id,
            method = %request.method(),
            path = %request.path(),
            route = tracing::field::Empty,
            instance = tracing::field::Empty,
        )
    }

    fn on_request_end<B: MessageBody>(span: Span, outcome: &Result<ServiceResponse<B>, Error>) {
        let _entered = span.enter();
        match outcome {
            Ok(response) => {
                let request = response.request();
                let extensions = request.extensions();
                let elapsed = extensions
                    .get::<RequestId>()
                    .map(|id| id.started.elapsed())
                    .unwrap_or_default();
                let (route_key, route) = match extensions.get::<Routed>().map(|routed| &routed.target) {
                    Some(Target::Route(route)) => (Arc::as_ptr(route) as usize, &*route.name),
                    Some(Target::Health) => (1, "/health"),
                    Some(Target::Metrics) => (2, "/metrics"),
                    _ => (0, "-"),
                };
                let status = response.status().as_u16();
                crate::metrics::request_completed(route_key, route, request.method(), status, elapsed);
                // Microsecond precision, printed as milliseconds (0.103, not 0.10321499…).
                let latency_ms = (elapsed.as_secs_f64() * 1e6).round() / 1e3;
                tracing::info!(status, latency_ms, "request completed");
            }
            Err(error) => tracing::error!(%error, "request failed"),
        }
    }
}
