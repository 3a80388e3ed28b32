//! Logging: a `tracing` subscriber (text, or JSON lines with
//! `GATEHOUSE_LOG_FORMAT=json`) filtered by `GATEHOUSE_LOG` or `RUST_LOG`,
//! and the per-request root span for `tracing-actix-web`.
//!
//! Every request gets one span carrying its request id, route and instance,
//! so every line logged while serving it names the request, and one
//! `request completed` line with status and latency.
//!
//! A malformed request is the client's error and is logged at debug, never
//! error (SPEC §3): actix-http logs the requests its parser rejects at ERROR,
//! so [`DemoteClientErrors`] logs those lines again at debug instead.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::{Error, HttpMessage};
use std::sync::Arc;

use tracing::callsite::{Callsite, Identifier};
use tracing::field::{Field, FieldSet, Value, Visit};
use tracing::metadata::Kind;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Span, Subscriber};
use tracing_actix_web::RootSpanBuilder;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

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
        builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .finish()
            .with(DemoteClientErrors)
            .try_init()
    } else {
        builder.finish().with(DemoteClientErrors).try_init()
    };
    guard
}

/// Where actix-http's HTTP/1 dispatcher logs, and how its line for a request
/// it could not parse begins (`stream error: request parse error: …`, at
/// ERROR, once per rejected connection).
const DISPATCHER_TARGET: &str = "actix_http::h1::dispatcher";
const PARSE_ERROR_PREFIX: &str = "stream error: request parse error";

/// Turns actix-http's ERROR line for a request its parser rejected into a
/// debug line of ours: any client could otherwise fill the error log with
/// garbage requests. The dispatcher's other errors keep their level.
///
/// A subscriber cannot change an event's level, so the line is vetoed and a
/// debug event recorded in its place, straight into the layers below (as
/// tracing-log does for `log` records): dispatching it afresh from inside a
/// dispatch would be dropped by tracing's re-entrancy guard. Other events are
/// told apart by their static metadata, before any formatting.
pub struct DemoteClientErrors;

impl<S: Subscriber> Layer<S> for DemoteClientErrors {
    fn event_enabled(&self, event: &Event<'_>, ctx: Context<'_, S>) -> bool {
        let metadata = event.metadata();
        if *metadata.level() != Level::ERROR || metadata.target() != DISPATCHER_TARGET {
            return true;
        }
        let mut message = Message::default();
        event.record(&mut message);
        if !message.0.starts_with(PARSE_ERROR_PREFIX) {
            return true;
        }
        if ctx.enabled(&DEMOTED) {
            let error = tracing::field::display(message.0.trim_start_matches("stream error: "));
            let fields = DEMOTED.fields();
            let mut names = fields.iter();
            let (message_field, error_field) = (names.next().unwrap(), names.next().unwrap());
            let values: [(&Field, Option<&dyn Value>); 2] = [
                (
                    &message_field,
                    Some(&format_args!("malformed request rejected") as &dyn Value),
                ),
                (&error_field, Some(&error as &dyn Value)),
            ];
            ctx.event(&Event::new(&DEMOTED, &fields.value_set(&values)));
        }
        false
    }
}

/// The callsite of the debug line that replaces a demoted one.
struct DemotedCallsite;

static DEMOTED_CALLSITE: DemotedCallsite = DemotedCallsite;

static DEMOTED: Metadata<'static> = Metadata::new(
    "malformed request rejected",
    module_path!(),
    Level::DEBUG,
    Some(file!()),
    Some(line!()),
    Some(module_path!()),
    FieldSet::new(&["message", "error"], Identifier(&DEMOTED_CALLSITE)),
    Kind::EVENT,
);

impl Callsite for DemotedCallsite {
    fn set_interest(&self, _: Interest) {}

    fn metadata(&self) -> &Metadata<'_> {
        &DEMOTED
    }
}

/// The `message` field of an event, formatted.
#[derive(Default)]
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
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
                    Some(Target::Route(route) | Target::Preflight(route)) => {
                        (Arc::as_ptr(route) as usize, &*route.name)
                    }
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Level, target and message of every event that reaches it.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<(Level, String, String)>>>);

    impl<S: Subscriber> Layer<S> for Captured {
        fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
            let mut message = Message::default();
            event.record(&mut message);
            let metadata = event.metadata();
            self.0
                .lock()
                .unwrap()
                .push((*metadata.level(), metadata.target().to_owned(), message.0));
        }
    }

    #[test]
    fn only_the_dispatchers_parse_errors_are_demoted_to_debug() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::registry()
            .with(captured.clone())
            .with(DemoteClientErrors);
        tracing::subscriber::with_default(subscriber, || {
            let error = "request parse error: invalid Header provided";
            tracing::error!(target: "actix_http::h1::dispatcher", "stream error: {}", error);
            tracing::error!(target: "actix_http::h1::dispatcher", "stream error: {}", "internal error");
            tracing::error!(target: "gatehouse::proxy", "stream error: {error}");
        });
        let owned = |level, target: &str, message: &str| (level, target.to_owned(), message.to_owned());
        assert_eq!(
            *captured.0.lock().unwrap(),
            [
                owned(Level::DEBUG, "gatehouse::telemetry", "malformed request rejected"),
                owned(
                    Level::ERROR,
                    "actix_http::h1::dispatcher",
                    "stream error: internal error"
                ),
                owned(
                    Level::ERROR,
                    "gatehouse::proxy",
                    "stream error: request parse error: invalid Header provided"
                ),
            ]
        );
    }
}
