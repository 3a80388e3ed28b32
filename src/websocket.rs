//! WebSocket tunnels on routes with `websocket = true` (SPEC §9).
//!
//! The upgrade request has passed the whole pipeline (limits, auth, roles)
//! by the time it gets here. The gateway sends the handshake on to the
//! instance over a connection of its own (awc's connector; the client's key
//! and protocols, the forwarding headers), and only once the instance has
//! answered 101, with the accept value of that key, does the client get its
//! 101 (`actix-ws`). Any other answer goes back as a normal response. Then a
//! task on the worker relays messages both ways, frame by frame, so
//! fragmented messages stay fragmented and pings are relayed, not answered.
//!
//! The client's side is served by actix-web as a response whose body streams
//! until the tunnel ends: actix-http keeps the socket (no upgrade service is
//! installed), so the connection watchdog sees an open tunnel as a request in
//! flight and leaves it alone.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_codec::Framed;
use actix_http::body::SizedStream;
use actix_http::error::ParseError;
use actix_http::h1::ClientCodec;
use actix_http::ws::{CloseCode, CloseReason, Codec, Frame, Item, Message, ProtocolError};
use actix_http::{RequestHead, ResponseHead};
use actix_service::Service as _;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::{ConnectionType, Method, StatusCode, Uri, Version};
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{MessageStream, Session};
use awc::error::{ConnectError, SendRequestError};
use bytestring::ByteString;
use futures_util::future::LocalBoxFuture;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};

use crate::error::GatewayError;
use crate::gateway::Service;
use crate::proxy;
use crate::routing::Route;
use crate::worker::Snapshot;

/// The largest message relayed either way; a larger one closes the tunnel.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// A tunnel with no message either way for this long is closed.
const IDLE_CLOSE: Duration = Duration::from_secs(300);

/// [`IDLE_CLOSE`], unless the environment variable
/// `GATEHOUSE_TEST_WEBSOCKET_IDLE_MS` says otherwise: a hook for the tests,
/// which cannot wait five minutes. Read once per process.
fn idle_close() -> Duration {
    static IDLE: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *IDLE.get_or_init(|| {
        std::env::var("GATEHOUSE_TEST_WEBSOCKET_IDLE_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map_or(IDLE_CLOSE, Duration::from_millis)
    })
}

/// After one side's close, how long the other side has to answer it.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Tunnels are told to close this long before the drain ends, so their
/// close frames go out before the server drops the connections.
const SHUTDOWN_MARGIN: Duration = Duration::from_millis(500);

/// Tells every tunnel of one gateway to close with 1001: the drain on
/// shutdown has run its course (SPEC §9). Each worker's App holds a
/// [`TunnelShutdown`] subscribed to it.
#[derive(Clone)]
pub struct TunnelCloser(Arc<tokio::sync::watch::Sender<bool>>);

/// What a tunnel waits on to learn the gateway is shutting down.
#[derive(Clone)]
pub struct TunnelShutdown(tokio::sync::watch::Receiver<bool>);

impl TunnelCloser {
    pub fn new() -> (Self, TunnelShutdown) {
        let (sender, receiver) = tokio::sync::watch::channel(false);
        (Self(Arc::new(sender)), TunnelShutdown(receiver))
    }

    /// Closes the open tunnels just before a drain of `drain` ends.
    pub async fn close_before_drain_ends(self, drain: Duration) {
        actix_rt::time::sleep(drain.saturating_sub(SHUTDOWN_MARGIN)).await;
        tracing::info!("closing the open WebSocket tunnels");
        self.0.send_replace(true);
    }
}

impl TunnelShutdown {
    async fn requested(&mut self) {
        if self.0.wait_for(|closing| *closing).await.is_err() {
            // The gateway is gone without a shutdown: wait for ever.
            std::future::pending::<()>().await;
        }
    }
}

/// `GET` over HTTP/1.1 with `Upgrade: websocket` and `Connection: upgrade`.
pub fn is_websocket_upgrade(req: &HttpRequest) -> bool {
    req.method() == Method::GET
        && req.version() == Version::HTTP_11
        && lists_token(req, header::UPGRADE, "websocket")
        && lists_token(req, header::CONNECTION, "upgrade")
}

fn lists_token(req: &HttpRequest, name: HeaderName, token: &str) -> bool {
    req.headers()
        .get_all(name)
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| item.trim().eq_ignore_ascii_case(token))
}

/// Opens the tunnel for a checked upgrade request: the client's 101, or
/// the instance's other answer, or the gateway's error.
pub async fn tunnel(
    req: &HttpRequest,
    payload: web::Payload,
    route: &Route,
    path: &str,
    ctx: &Snapshot,
) -> Result<HttpResponse, GatewayError> {
    if let Err(err) = actix_http::ws::verify_handshake(req.head()) {
        tracing::debug!(reason = %err, "WebSocket handshake refused");
        return Err(GatewayError::BadRequest("invalid WebSocket handshake"));
    }
    let service = &ctx.gateway.services[route.service];
    let path_and_query = proxy::upstream_path_and_query(req, route, path)?;
    let first = ctx
        .pick_target(route.service, None)
        .await
        .ok_or_else(|| unavailable(service, "no healthy instance".to_owned()))?;
    let mut attempt = handshake(req, route, ctx, first, &path_and_query).await;
    if let Err(Refused::Connect(reason) | Refused::Reset(reason)) = &attempt {
        // A handshake has no body: the next instance gets it whole.
        if let Some(second) = ctx.pick_target(route.service, Some(first)).await {
            tracing::debug!(failed = %service.instances[first].url, %reason, "retrying the WebSocket handshake");
            attempt = handshake(req, route, ctx, second, &path_and_query).await;
        }
    }
    let (upstream_head, upstream) = match attempt {
        Ok(connected) => connected,
        Err(Refused::Answered(response)) => return Ok(response),
        Err(Refused::Connect(reason) | Refused::Reset(reason)) => return Err(unavailable(service, reason)),
        Err(Refused::Timeout) => {
            return Err(GatewayError::GatewayTimeout {
                service: service.name.to_string(),
            })
        }
        Err(Refused::BadAnswer(reason)) => {
            return Err(GatewayError::BadGateway {
                service: service.name.to_string(),
                reason,
            })
        }
    };
    let (mut response, session, messages) = actix_ws::handle(req, payload).map_err(|err| {
        tracing::debug!(reason = %err, "WebSocket handshake refused");
        GatewayError::BadRequest("invalid WebSocket handshake")
    })?;
    if let Some(protocol) = upstream_head.headers.get(header::SEC_WEBSOCKET_PROTOCOL) {
        response
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, protocol.clone());
    }
    let route_name = route.name.clone();
    let shutdown = req.app_data::<TunnelShutdown>().cloned();
    actix_rt::spawn(async move {
        crate::metrics::tunnel_opened(&route_name);
        let messages = messages.max_frame_size(MAX_MESSAGE_BYTES);
        let (ended, upstream) = relay(session, messages, upstream, shutdown).await;
        tracing::debug!(route = %route_name, ended = ended.label(), "WebSocket tunnel ended");
        crate::metrics::tunnel_closed(&route_name, ended.label());
        if let Some(upstream) = upstream {
            finish(upstream).await;
        }
    });
    Ok(response)
}

fn unavailable(service: &Service, reason: String) -> GatewayError {
    GatewayError::ServiceUnavailable {
        service: service.name.to_string(),
        reason,
    }
}

/// Why the instance's handshake did not give a tunnel.
enum Refused {
    /// No connection: nothing was sent.
    Connect(String),
    /// The connection broke before an answer (the handshake has no body, so
    /// it may go to another instance, as a body-less request would).
    Reset(String),
    Timeout,
    /// The instance answered with another status than 101: its answer,
    /// passed on as a normal response.
    Answered(HttpResponse),
    /// A 101 that is not a valid WebSocket answer.
    BadAnswer(String),
}

/// A connection to an instance, whatever its transport (TCP or TLS).
pub trait TunnelIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> TunnelIo for T {}

/// The instance's side of a tunnel.
type InstanceSocket = Framed<Box<dyn TunnelIo>, Codec>;
type Handshaking = Framed<Box<dyn TunnelIo>, ClientCodec>;

/// Sends a request head on a new connection to an instance and reads the
/// answer's head, keeping the connection for what follows (awc's
/// `Connection::open_tunnel`, which does not check the answer, unlike its
/// WebSocket client, which keeps nothing of an answer but its status).
pub type TunnelOpener =
    Rc<dyn Fn(Uri, RequestHead) -> LocalBoxFuture<'static, Result<(ResponseHead, Handshaking), SendRequestError>>>;

/// A [`TunnelOpener`] over awc's connector with no connection cap (a tunnel
/// never goes back to a pool), `upstream.connect_timeout_ms` and the
/// upstream TLS configuration.
pub fn tunnel_opener(connect_timeout: Duration, tls: Arc<rustls::ClientConfig>) -> TunnelOpener {
    let connector = Rc::new(
        awc::Connector::new()
            .timeout(connect_timeout)
            .limit(0)
            .rustls_0_23(tls)
            .finish(),
    );
    Rc::new(move |uri, head| {
        let connector = connector.clone();
        Box::pin(async move {
            let connection = connector
                .call(awc::Connect { uri, addr: None })
                .await
                .map_err(SendRequestError::Connect)?;
            let (head, framed) = connection.open_tunnel(head).await?;
            Ok((head, framed.into_map_io(|io| Box::new(io) as Box<dyn TunnelIo>)))
        })
    })
}

async fn handshake(
    req: &HttpRequest,
    route: &Route,
    ctx: &Snapshot,
    index: usize,
    path_and_query: &actix_web::http::uri::PathAndQuery,
) -> Result<(ResponseHead, InstanceSocket), Refused> {
    let instance = &ctx.gateway.services[route.service].instances[index];
    let uri = proxy::upstream_uri(instance, path_and_query).map_err(Refused::BadAnswer)?;
    let mut head = RequestHead::default();
    head.method = Method::GET;
    head.uri = uri.clone();
    head.version = Version::HTTP_11;
    head.headers = proxy::upstream_headers(req, &ctx.gateway);
    // The client's key and protocols go as they came (so the instance's
    // `Sec-WebSocket-Accept` answers the client's key); no extension
    // (compression) is negotiated through the gateway.
    head.headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    for name in [header::SEC_WEBSOCKET_KEY, header::SEC_WEBSOCKET_VERSION] {
        if let Some(value) = req.headers().get(&name) {
            head.headers.insert(name, value.clone());
        }
    }
    head.headers
        .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    head.set_connection_type(ConnectionType::Upgrade);
    let host = route.preserve_host.then(|| proxy::client_host_value(req)).flatten();
    head.headers
        .insert(header::HOST, host.unwrap_or_else(|| instance.host.clone()));

    let opened = actix_rt::time::timeout(route.request_timeout, (ctx.tunnels)(uri, head)).await;
    let (answer, framed) = match opened {
        Err(_) | Ok(Err(SendRequestError::Timeout)) => return Err(Refused::Timeout),
        Ok(Err(SendRequestError::Connect(ConnectError::Disconnected))) => {
            return Err(Refused::Reset("connection closed before the answer".to_owned()))
        }
        Ok(Err(SendRequestError::Connect(err))) => return Err(Refused::Connect(err.to_string())),
        Ok(Err(
            err @ (SendRequestError::Send(_) | SendRequestError::Response(ParseError::Io(_) | ParseError::Incomplete)),
        )) => return Err(Refused::Reset(err.to_string())),
        Ok(Err(err)) => return Err(Refused::BadAnswer(err.to_string())),
        Ok(Ok(opened)) => opened,
    };
    if answer.status != StatusCode::SWITCHING_PROTOCOLS {
        return Err(Refused::Answered(passed_on(answer, framed)));
    }
    let expected = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|key| actix_http::ws::hash_key(key.as_bytes()));
    let accepted = answer
        .headers
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .map(HeaderValue::as_bytes);
    let upgraded = answer
        .headers
        .get(header::UPGRADE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.eq_ignore_ascii_case("websocket"));
    if !upgraded || expected.as_ref().map(|key| &key[..]) != accepted {
        return Err(Refused::BadAnswer("a 101 that is not a WebSocket handshake".to_owned()));
    }
    let socket = framed.into_map_codec(|_| Codec::new().max_size(MAX_MESSAGE_BYTES).client_mode());
    Ok((answer, socket))
}

/// An instance's answer other than 101, as the client's response: its
/// status, its headers less hop-by-hop ones, `Server` and `X-Powered-By`,
/// and its body as it arrives.
fn passed_on(answer: ResponseHead, framed: Handshaking) -> HttpResponse {
    let mut response = HttpResponse::build(answer.status);
    let length = answer
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse::<u64>().ok());
    for (name, value) in answer.headers.iter() {
        if proxy::is_hop_by_hop(name)
            || name == header::CONTENT_LENGTH
            || name == header::SERVER
            || name.as_str() == "x-powered-by"
        {
            continue;
        }
        response.append_header((name.clone(), value.clone()));
    }
    let payload = framed.into_map_codec(ClientCodec::into_payload_codec);
    let body = futures_util::stream::unfold(Some(payload), |payload| async move {
        let mut payload = payload?;
        match payload.next().await? {
            Ok(Some(bytes)) => Some((Ok::<_, actix_web::Error>(bytes), Some(payload))),
            Ok(None) => None,
            // Cut short: the client sees the connection end early.
            Err(err) => Some((Err(actix_web::error::ErrorBadGateway(err)), None)),
        }
    });
    match length {
        Some(length) => response.body(SizedStream::new(length, Box::pin(body))),
        None => response.streaming(body),
    }
}

/// How a tunnel ended, as the metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// A close handshake, started by the client.
    ClientClosed,
    /// A close handshake, started by the instance.
    UpstreamClosed,
    /// The client's connection ended without a close.
    ClientGone,
    /// The instance's connection ended without a close.
    UpstreamGone,
    /// A message over [`MAX_MESSAGE_BYTES`].
    TooLarge,
    /// A frame that breaks the protocol.
    ProtocolError,
    Idle,
    /// The gateway shut down.
    Shutdown,
}

impl Ended {
    fn label(self) -> &'static str {
        match self {
            Ended::ClientClosed => "client_closed",
            Ended::UpstreamClosed => "upstream_closed",
            Ended::ClientGone => "client_gone",
            Ended::UpstreamGone => "upstream_gone",
            Ended::TooLarge => "too_large",
            Ended::ProtocolError => "protocol_error",
            Ended::Idle => "idle",
            Ended::Shutdown => "shutdown",
        }
    }
}

/// The size of the message a direction is in the middle of.
#[derive(Default)]
struct MessageSize {
    so_far: usize,
}

impl MessageSize {
    /// False when the frame takes its message over [`MAX_MESSAGE_BYTES`].
    fn admits(&mut self, frame: &Message) -> bool {
        match frame {
            Message::Text(text) => text.len() <= MAX_MESSAGE_BYTES,
            Message::Binary(bytes) => bytes.len() <= MAX_MESSAGE_BYTES,
            Message::Continuation(item) => {
                let (starts, ends, bytes) = match item {
                    Item::FirstText(bytes) | Item::FirstBinary(bytes) => (true, false, bytes),
                    Item::Continue(bytes) => (false, false, bytes),
                    Item::Last(bytes) => (false, true, bytes),
                };
                self.so_far = if starts { bytes.len() } else { self.so_far + bytes.len() };
                let fits = self.so_far <= MAX_MESSAGE_BYTES;
                if ends {
                    self.so_far = 0;
                }
                fits
            }
            _ => true,
        }
    }
}

fn close(code: CloseCode) -> Option<CloseReason> {
    Some(CloseReason {
        code,
        description: None,
    })
}

/// An instance's frame as the message the client gets; `None` for a text
/// frame that is not UTF-8.
fn to_client(frame: Frame) -> Option<Message> {
    Some(match frame {
        Frame::Text(bytes) => Message::Text(ByteString::try_from(bytes).ok()?),
        Frame::Binary(bytes) => Message::Binary(bytes),
        Frame::Continuation(item) => Message::Continuation(item),
        Frame::Ping(bytes) => Message::Ping(bytes),
        Frame::Pong(bytes) => Message::Pong(bytes),
        Frame::Close(reason) => Message::Close(reason),
    })
}

/// Sends one message to the client; false once the client's side is gone
/// or has not taken the message within `limit`.
///
/// A close goes out through a clone of the session: the session itself
/// lives until the relay ends, so the client's answer to a close can still
/// be read (the response body, and with it the connection, ends when the
/// last session is dropped).
async fn send_to_client(session: &mut Session, message: Message, limit: Duration) -> bool {
    let send = async {
        match message {
            Message::Text(text) => session.text(text).await,
            Message::Binary(bytes) => session.binary(bytes).await,
            Message::Continuation(item) => session.continuation(item).await,
            Message::Ping(bytes) => session.ping(&bytes).await,
            Message::Pong(bytes) => session.pong(&bytes).await,
            Message::Close(reason) => session.clone().close(reason).await,
            Message::Nop => Ok(()),
        }
    };
    matches!(actix_rt::time::timeout(limit, send).await, Ok(Ok(())))
}

/// Closes both sides, each with its own code (the side at fault gets the
/// reason, the other 1001), and says how the tunnel ended.
async fn close_both(
    session: &mut Session,
    sink: &InstanceSink,
    to_client: CloseCode,
    to_instance: CloseCode,
    ended: Ended,
) -> Ended {
    send_to_client(session, Message::Close(close(to_client)), CLOSE_GRACE).await;
    send_to_instance(sink, Message::Close(close(to_instance)), CLOSE_GRACE).await;
    ended
}

/// The instance's writing half, shared by both directions (each sends
/// closes to it); a send holds it only while it lasts.
type InstanceSink = futures_util::lock::Mutex<SplitSink<InstanceSocket, Message>>;

/// Sends one message to the instance; false once its side is gone or has
/// not taken the message within `limit` (waiting for the other direction's
/// send included).
async fn send_to_instance(sink: &InstanceSink, message: Message, limit: Duration) -> bool {
    let send = async { sink.lock().await.send(message).await };
    matches!(actix_rt::time::timeout(limit, send).await, Ok(Ok(())))
}

/// Lets the instance end its side: what it still sends (the rest of an
/// oversized frame, its answer to the gateway's close) is read and dropped
/// until it closes, [`CLOSE_GRACE`] at most. Closing a socket with unread
/// data would send a reset, which can destroy the close frame still on its
/// way to the instance.
async fn finish(mut upstream: InstanceSocket) {
    use tokio::io::AsyncReadExt;
    let socket = upstream.io_mut();
    let mut scratch = vec![0u8; 16 * 1024];
    let _ = actix_rt::time::timeout(CLOSE_GRACE, async {
        while let Ok(1..) = socket.read(&mut scratch).await {}
    })
    .await;
}

/// What both directions of a tunnel know.
struct TunnelState {
    /// The last message either way.
    activity: Cell<Instant>,
    /// Who closed first, once someone has.
    first_close: Cell<Option<Ended>>,
    /// `IDLE_CLOSE` (or its test value): also how long a send may wait.
    idle: Duration,
}

impl TunnelState {
    fn touch(&self) {
        self.activity.set(Instant::now());
    }

    /// After a message that closes its direction: the tunnel's end when the
    /// other side had closed already, else `None` (its answer is awaited).
    fn closed_by(&self, side: Ended) -> Option<Ended> {
        match self.first_close.get() {
            Some(first) => Some(first),
            None => {
                self.first_close.set(Some(side));
                None
            }
        }
    }

    /// Resolves when the tunnel has been quiet too long: the idle limit, or
    /// [`CLOSE_GRACE`] once one side has closed and the other has not
    /// answered.
    async fn quiet(&self) {
        loop {
            let limit = if self.first_close.get().is_some() {
                CLOSE_GRACE
            } else {
                self.idle
            };
            let deadline = self.activity.get() + limit;
            if Instant::now() >= deadline {
                return;
            }
            actix_rt::time::sleep_until(deadline.into()).await;
        }
    }
}

/// The client's messages to the instance, until this direction ends the
/// tunnel.
async fn client_to_instance(
    client: &mut MessageStream,
    mut session: Session,
    sink: &InstanceSink,
    state: &TunnelState,
) -> Ended {
    let mut size = MessageSize::default();
    loop {
        match client.next().await {
            Some(Ok(message)) => {
                state.touch();
                if !size.admits(&message) {
                    return close_both(&mut session, sink, CloseCode::Size, CloseCode::Away, Ended::TooLarge).await;
                }
                let is_close = matches!(message, Message::Close(_));
                if !send_to_instance(sink, message, state.idle).await {
                    send_to_client(&mut session, Message::Close(close(CloseCode::Away)), CLOSE_GRACE).await;
                    return state.first_close.get().unwrap_or(Ended::UpstreamGone);
                }
                if is_close {
                    if let Some(ended) = state.closed_by(Ended::ClientClosed) {
                        return ended;
                    }
                }
            }
            Some(Err(ProtocolError::Overflow)) => {
                return close_both(&mut session, sink, CloseCode::Size, CloseCode::Away, Ended::TooLarge).await;
            }
            Some(Err(err)) => {
                tracing::debug!(error = %err, "WebSocket client broke the protocol");
                return close_both(
                    &mut session,
                    sink,
                    CloseCode::Protocol,
                    CloseCode::Away,
                    Ended::ProtocolError,
                )
                .await;
            }
            None => {
                if state.first_close.get().is_none() {
                    send_to_instance(sink, Message::Close(close(CloseCode::Away)), CLOSE_GRACE).await;
                }
                return state.first_close.get().unwrap_or(Ended::ClientGone);
            }
        }
    }
}

/// The instance's messages to the client, until this direction ends the
/// tunnel.
async fn instance_to_client(
    frames: &mut SplitStream<InstanceSocket>,
    mut session: Session,
    sink: &InstanceSink,
    state: &TunnelState,
) -> Ended {
    let mut size = MessageSize::default();
    loop {
        match frames.next().await {
            Some(Ok(frame)) => {
                state.touch();
                let Some(message) = to_client(frame) else {
                    return close_both(
                        &mut session,
                        sink,
                        CloseCode::Away,
                        CloseCode::Invalid,
                        Ended::ProtocolError,
                    )
                    .await;
                };
                if !size.admits(&message) {
                    return close_both(&mut session, sink, CloseCode::Away, CloseCode::Size, Ended::TooLarge).await;
                }
                let is_close = matches!(message, Message::Close(_));
                if !send_to_client(&mut session, message, state.idle).await && !is_close {
                    send_to_instance(sink, Message::Close(close(CloseCode::Away)), CLOSE_GRACE).await;
                    return state.first_close.get().unwrap_or(Ended::ClientGone);
                }
                if is_close {
                    if let Some(ended) = state.closed_by(Ended::UpstreamClosed) {
                        return ended;
                    }
                }
            }
            Some(Err(ProtocolError::Overflow)) => {
                return close_both(&mut session, sink, CloseCode::Away, CloseCode::Size, Ended::TooLarge).await;
            }
            Some(Err(err)) => {
                tracing::debug!(error = %err, "WebSocket instance broke the protocol");
                return close_both(
                    &mut session,
                    sink,
                    CloseCode::Away,
                    CloseCode::Protocol,
                    Ended::ProtocolError,
                )
                .await;
            }
            None => {
                if state.first_close.get().is_none() {
                    send_to_client(&mut session, Message::Close(close(CloseCode::Away)), CLOSE_GRACE).await;
                }
                return state.first_close.get().unwrap_or(Ended::UpstreamGone);
            }
        }
    }
}

/// Relays both directions independently (a slow reader on one side never
/// holds up the other) until one of them ends the tunnel, or it goes quiet,
/// or the gateway shuts down; says how it ended and gives the instance's
/// connection back for [`finish`].
async fn relay(
    session: Session,
    mut client: MessageStream,
    upstream: InstanceSocket,
    shutdown: Option<TunnelShutdown>,
) -> (Ended, Option<InstanceSocket>) {
    let (sink, mut frames) = upstream.split();
    let sink: InstanceSink = futures_util::lock::Mutex::new(sink);
    let state = TunnelState {
        activity: Cell::new(Instant::now()),
        first_close: Cell::new(None),
        idle: idle_close(),
    };
    let mut shutdown = shutdown;
    let mut closer = session.clone();
    let ended = {
        let shutdown_requested = async {
            match shutdown.as_mut() {
                Some(shutdown) => shutdown.requested().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ended = client_to_instance(&mut client, session.clone(), &sink, &state) => ended,
            ended = instance_to_client(&mut frames, session, &sink, &state) => ended,
            () = shutdown_requested => {
                close_both(&mut closer, &sink, CloseCode::Away, CloseCode::Away, Ended::Shutdown).await
            }
            () = state.quiet() => match state.first_close.get() {
                // One side closed and the other never answered.
                Some(first) => first,
                None => {
                    close_both(&mut closer, &sink, CloseCode::Away, CloseCode::Away, Ended::Idle).await
                }
            },
        }
    };
    drop(closer);
    (ended, sink.into_inner().reunite(frames).ok())
}
