//! Steps 6–8 of the pipeline: pick an instance, forward with awc, stream the
//! answer back.
//!
//! Both bodies stream: the request body is handed to awc as a stream capped at
//! `server.max_body_bytes`, the upstream's body is handed to actix as a stream,
//! and neither is ever collected. Headers are rebuilt rather than patched: the
//! client's headers are copied less hop-by-hop ones (and those its `Connection`
//! names), then the gateway adds its own, so no client header can remove or
//! impersonate them.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_http::body::{self as http_body, BoxBody, SizedStream};
use actix_http::error::ParseError;
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::uri::{PathAndQuery, Scheme, Uri};
use actix_web::http::{ConnectionType, Method, StatusCode, Version};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use awc::error::{ConnectError, PayloadError, SendRequestError};
use bytes::Bytes;
use futures_util::Stream;

use crate::actors::registry::ReportPassiveFailure;
use crate::auth::Identity;
use crate::error::GatewayError;
use crate::gateway::{Gateway, Instance, Service};
use crate::middleware::request_id::{RequestId, X_REQUEST_ID};
use crate::routing::{request_host, strip_route_prefix, Route};
use crate::tls::OverTls;
use crate::worker::Snapshot;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_USER_ID: HeaderName = HeaderName::from_static("x-user-id");
const X_USER_ROLES: HeaderName = HeaderName::from_static("x-user-roles");
const X_POWERED_BY: HeaderName = HeaderName::from_static("x-powered-by");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers the middleware adds to a proxied response: twelve security
/// headers, `X-Request-Id` and five `RateLimit-*`/`Retry-After` at most.
const GATEWAY_RESPONSE_HEADERS: usize = 18;

/// Why one attempt to reach an instance failed.
#[derive(Debug)]
enum Failure {
    /// No connection was made: nothing was sent, not even the head.
    Connect(String),
    /// The connection broke after the request started, before a response head.
    Reset(String),
    Timeout,
    /// The instance answered with a head the client cannot parse (a garbled
    /// line, more header lines than awc accepts). A client can provoke this
    /// on purpose, so it says nothing about the instance's health.
    BadResponse(String),
    /// The request body outgrew `max_body_bytes` while streaming.
    BodyTooLarge,
    /// The client's own body failed (disconnect, bad chunking).
    ClientBody,
    Internal(String),
}

impl Failure {
    fn classify(error: SendRequestError, body_overflowed: bool) -> Self {
        match error {
            _ if body_overflowed => Self::BodyTooLarge,
            // awc reports a connection that ended before any response head
            // (after the request was written) as `Disconnected`.
            SendRequestError::Connect(ConnectError::Disconnected) => {
                Self::Reset("connection closed before the response head".to_owned())
            }
            SendRequestError::Connect(err) => Self::Connect(err.to_string()),
            SendRequestError::Timeout => Self::Timeout,
            SendRequestError::Send(err) => Self::Reset(err.to_string()),
            SendRequestError::Response(err @ (ParseError::Io(_) | ParseError::Incomplete)) => {
                Self::Reset(err.to_string())
            }
            SendRequestError::Response(err) => Self::BadResponse(err.to_string()),
            SendRequestError::H2(err) => Self::Reset(err.to_string()),
            SendRequestError::Body(_) => Self::ClientBody,
            other => Self::Internal(other.to_string()),
        }
    }

    /// Failures that say something about the instance's health.
    fn counts_against_instance(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::Reset(_) | Self::Timeout)
    }

    /// Failures any client can cause at will (its own body; an answer it
    /// asked an instance for on purpose): logged at debug, so clients cannot
    /// flood the log (SPEC §3). Metrics still count them.
    fn is_provoked_by_the_client(&self) -> bool {
        matches!(self, Self::BodyTooLarge | Self::ClientBody | Self::BadResponse(_))
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Reset(_) => "reset",
            Self::Timeout => "timeout",
            Self::BadResponse(_) => "bad_response",
            Self::BodyTooLarge => "body_too_large",
            Self::ClientBody => "client_body",
            Self::Internal(_) => "internal",
        }
    }

    fn into_error(self, service: &Service) -> GatewayError {
        let service = service.name.to_string();
        match self {
            Self::Connect(reason) | Self::Reset(reason) => GatewayError::ServiceUnavailable { service, reason },
            Self::Timeout => GatewayError::GatewayTimeout { service },
            Self::BadResponse(reason) => GatewayError::BadGateway { service, reason },
            Self::BodyTooLarge => GatewayError::PayloadTooLarge,
            Self::ClientBody => GatewayError::BadRequest("request body failed"),
            Self::Internal(reason) => GatewayError::Internal(reason),
        }
    }
}

fn unavailable(service: &Service, reason: &str) -> GatewayError {
    GatewayError::ServiceUnavailable {
        service: service.name.to_string(),
        reason: reason.to_owned(),
    }
}

/// Forwards one request on `route` and streams the answer back.
pub async fn forward(
    req: &HttpRequest,
    payload: web::Payload,
    route: &Route,
    path: &str,
    ctx: &Snapshot,
) -> Result<HttpResponse, GatewayError> {
    // One deadline for the whole forward: a retry only gets what is left.
    let deadline = Instant::now() + route.request_timeout;
    let service = &ctx.gateway.services[route.service];
    let path_and_query = upstream_path_and_query(req, route, path)?;
    let payload = payload.into_inner();
    let body = if req.version() == Version::HTTP_2 {
        let (framing, payload) = h2_body(req, payload, deadline).await?;
        RequestBody::with(framing, payload, ctx.gateway.max_body_bytes)
    } else {
        RequestBody::of(req, payload, ctx.gateway.max_body_bytes)
    };
    let framing = body.framing();
    let progress = body.progress();
    let forwarding = Forwarding {
        ctx,
        req,
        route,
        path_and_query: &path_and_query,
        deadline,
    };

    let first = ctx
        .pick_target(route.service, None)
        .await
        .ok_or_else(|| unavailable(service, "no healthy instance"))?;
    let failure = match forwarding.attempt(first, body).await {
        Ok(response) => return Ok(response),
        Err(failure) => failure,
    };
    let retry_body = match (&failure, framing) {
        (Failure::Connect(_) | Failure::Reset(_), Framing::None) => Some(RequestBody::None),
        (Failure::Connect(_) | Failure::Reset(_), Framing::Empty) => Some(RequestBody::Empty),
        // Nothing reached the instance, and awc only reads the client's
        // body once connected, so the body is still whole.
        (Failure::Connect(_), framing) => progress
            .and_then(|progress| progress.untouched.take())
            .map(|payload| RequestBody::with(framing, payload, ctx.gateway.max_body_bytes)),
        _ => None,
    };
    let Some(retry_body) = retry_body.filter(|_| Instant::now() < deadline) else {
        return Err(failure.into_error(service));
    };
    let Some(second) = ctx.pick_target(route.service, Some(first)).await else {
        return Err(failure.into_error(service));
    };
    tracing::debug!(failed = %service.instances[first].url, retry = %service.instances[second].url, "retrying on the next instance");
    forwarding
        .attempt(second, retry_body)
        .await
        .map_err(|failure| failure.into_error(service))
}

/// What every attempt of one forward shares.
struct Forwarding<'a> {
    ctx: &'a Snapshot,
    req: &'a HttpRequest,
    route: &'a Route,
    path_and_query: &'a PathAndQuery,
    deadline: Instant,
}

impl Forwarding<'_> {
    /// One try against one instance; on success the response is already built.
    async fn attempt(&self, index: usize, body: RequestBody) -> Result<HttpResponse, Failure> {
        let Self { ctx, req, route, .. } = *self;
        let service_index = route.service;
        let instance = &ctx.gateway.services[service_index].instances[index];
        tracing::Span::current().record("instance", instance.url.as_str());
        let mut headers = upstream_headers(req, &ctx.gateway);
        let host = route.preserve_host.then(|| client_host_value(req)).flatten();
        headers.insert(header::HOST, host.unwrap_or_else(|| instance.host.clone()));
        let uri = upstream_uri(instance, self.path_and_query).map_err(Failure::Internal)?;

        let upstream = ctx.upstream(service_index, index);
        let mut request = upstream
            .client
            .request(req.method().clone(), uri)
            .timeout(self.deadline.saturating_duration_since(Instant::now()))
            .no_decompress();
        *request.headers_mut() = headers;

        let progress = body.progress();
        let sent = match body {
            RequestBody::None => request.send_body(http_body::None::new()).await,
            RequestBody::Empty => request.send_body(()).await,
            RequestBody::Sized(length, stream) => request.send_body(SizedStream::new(length, stream)).await,
            RequestBody::Chunked(stream) => request.send_stream(stream).await,
        };
        match sent {
            Ok(response) => {
                upstream.failures.record_success();
                Ok(client_response(response, req, route, instance, &ctx.gateway))
            }
            Err(error) => {
                let overflowed = progress.as_ref().is_some_and(|progress| progress.overflowed.get());
                let failure = Failure::classify(error, overflowed);
                if failure.is_provoked_by_the_client() {
                    tracing::debug!(instance = %instance.url, kind = failure.kind(), error = ?failure, "request failed on the client's account");
                } else {
                    tracing::warn!(instance = %instance.url, kind = failure.kind(), error = ?failure, "upstream request failed");
                }
                crate::metrics::upstream_error(&ctx.gateway.services[service_index].name, failure.kind());
                // While the client's body is still arriving, a timeout or reset
                // may be the client's doing (a stalled upload) or a legitimate
                // early answer; only failures with the whole request sent say
                // something about the instance.
                let request_sent = progress.as_ref().is_none_or(|progress| progress.finished.get());
                let counts =
                    failure.counts_against_instance() && (request_sent || matches!(failure, Failure::Connect(_)));
                if counts && upstream.failures.record_failure(ctx.passive_threshold) {
                    ctx.registry.do_send(ReportPassiveFailure {
                        service: ctx.gateway.services[service_index].name.clone(),
                        url: instance.url.clone(),
                        reason: failure.kind().to_owned(),
                    });
                }
                Err(failure)
            }
        }
    }
}

pub(crate) fn upstream_path_and_query(
    req: &HttpRequest,
    route: &Route,
    path: &str,
) -> Result<PathAndQuery, GatewayError> {
    let path = if route.strip_prefix {
        strip_route_prefix(path, &route.prefix)
    } else {
        path.into()
    };
    let text = match req.uri().query() {
        Some(query) => format!("{path}?{query}"),
        None => path.into_owned(),
    };
    PathAndQuery::try_from(text).map_err(|_| GatewayError::BadRequest("invalid request target"))
}

pub(crate) fn upstream_uri(instance: &Instance, path_and_query: &PathAndQuery) -> Result<Uri, String> {
    let path_and_query = if instance.base_path.is_empty() {
        path_and_query.clone()
    } else {
        PathAndQuery::try_from(format!("{}{}", instance.base_path, path_and_query)).map_err(|err| err.to_string())?
    };
    Uri::builder()
        .scheme(instance.scheme.clone())
        .authority(instance.authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(|err| err.to_string())
}

/// True for headers that describe one connection, not the message.
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == KEEP_ALIVE
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == PROXY_CONNECTION
}

/// The names [`is_hop_by_hop`] is true for, as text.
const HOP_BY_HOP_NAMES: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
];

/// [`is_hop_by_hop`] for a name given as text, in any case (a `Connection`
/// token, or the dashed form of an underscore spelling).
fn is_hop_by_hop_name(name: &str) -> bool {
    HOP_BY_HOP_NAMES
        .iter()
        .any(|hop_by_hop| name.eq_ignore_ascii_case(hop_by_hop))
}

/// The header names listed in `Connection` besides the hop-by-hop ones,
/// which go anyway: the usual `Connection: keep-alive` lists nothing, and
/// costs no allocation. Compare with [`is_named`].
fn connection_named(headers: &HeaderMap) -> Vec<&str> {
    headers
        .get_all(header::CONNECTION)
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty() && !is_hop_by_hop_name(token))
        .collect()
}

/// Whether `name` is one of the `named` tokens (case-insensitive, as
/// header names are).
fn is_named(named: &[&str], name: &HeaderName) -> bool {
    named.iter().any(|token| token.eq_ignore_ascii_case(name.as_str()))
}

/// Headers the gateway sets itself or never forwards, on top of hop-by-hop.
fn is_gateway_owned(name: &HeaderName, trusted_peer: bool) -> bool {
    let name = name.as_str();
    if name.contains('_') {
        // CGI-style servers read `X_User_Id` as `X-User-Id` and some back
        // ends fold `Transfer_Encoding` into `Transfer-Encoding`: compare the
        // dashed form, so an underscore can smuggle neither an owned header
        // nor a second framing header.
        let dashed = name.replace('_', "-");
        return is_gateway_owned_name(&dashed, trusted_peer) || is_hop_by_hop_name(&dashed);
    }
    is_gateway_owned_name(name, trusted_peer)
}

fn is_gateway_owned_name(name: &str, trusted_peer: bool) -> bool {
    matches!(
        name,
        "host" | "content-length" | "expect" | "x-request-id" | "x-user-id" | "x-user-roles" | "x-forwarded-for"
    ) || (!trusted_peer && (name == "forwarded" || name == "x-real-ip" || name.starts_with("x-forwarded-")))
}

/// The peer's address as header text, formatted once per connection (the
/// `HttpServer::on_connect` hook) rather than once per request.
pub struct PeerText(HeaderValue);

/// The `HttpServer::on_connect` hook that stores [`PeerText`], and
/// [`OverTls`] for a connection of the TLS listener.
pub fn remember_peer(connection: &dyn std::any::Any, extensions: &mut actix_http::Extensions) {
    let Some((stream, over_tls)) = crate::tls::tcp_of(connection) else {
        return;
    };
    if let Some(text) = stream.peer_addr().ok().and_then(|peer| peer_header(peer.ip())) {
        extensions.insert(PeerText(text));
    }
    if over_tls {
        extensions.insert(OverTls);
    }
}

/// The scheme of the listener the request arrived on.
fn listener_scheme(req: &HttpRequest) -> &'static str {
    if req.conn_data::<OverTls>().is_some() {
        "https"
    } else {
        "http"
    }
}

fn peer_header(ip: std::net::IpAddr) -> Option<HeaderValue> {
    HeaderValue::from_str(&ip.to_string()).ok()
}

pub(crate) fn upstream_headers(req: &HttpRequest, gateway: &Gateway) -> HeaderMap {
    let incoming = req.headers();
    let named = connection_named(incoming);
    let peer = req.peer_addr().map(|addr| addr.ip());
    let trusted_peer = peer.is_some_and(|ip| gateway.is_trusted_proxy(ip));

    let mut headers = HeaderMap::with_capacity(incoming.len() + 6);
    for (name, value) in incoming.iter() {
        if is_hop_by_hop(name) || is_gateway_owned(name, trusted_peer) || is_named(&named, name) {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }

    // Only after the client's headers are filtered does the gateway add its
    // own, so `Connection: X-Forwarded-For` cannot remove them.
    let peer_text = match req.conn_data::<PeerText>() {
        Some(PeerText(text)) => text.clone(),
        None => peer
            .and_then(peer_header)
            .unwrap_or_else(|| HeaderValue::from_static("")),
    };
    let prior: Vec<&str> = if trusted_peer {
        incoming
            .get_all(X_FORWARDED_FOR)
            .filter_map(|value| value.to_str().ok())
            .collect()
    } else {
        Vec::new()
    };
    let forwarded_for = if prior.is_empty() {
        Some(peer_text)
    } else {
        let peer = peer_text.to_str().unwrap_or_default();
        HeaderValue::from_str(&format!("{}, {peer}", prior.join(", "))).ok()
    };
    if let Some(value) = forwarded_for {
        headers.insert(X_FORWARDED_FOR, value);
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(listener_scheme(req)));
    }
    if !headers.contains_key(&X_FORWARDED_HOST) {
        if let Some(host) = client_host_value(req) {
            headers.insert(X_FORWARDED_HOST, host);
        }
    }
    if let Some(id) = req.extensions().get::<RequestId>() {
        headers.insert(X_REQUEST_ID, id.value.clone());
    }
    if let Some(identity) = req.extensions().get::<Identity>() {
        // The verifier refused control characters, so these always build;
        // UTF-8 beyond ASCII travels as obs-text.
        if let Ok(value) = HeaderValue::from_bytes(identity.subject.as_bytes()) {
            headers.insert(X_USER_ID, value);
        }
        if let Ok(value) = HeaderValue::from_bytes(identity.roles.join(",").as_bytes()) {
            headers.insert(X_USER_ROLES, value);
        }
    }
    headers
}

/// The host the client addressed, already validated by the route matcher.
fn client_host(req: &HttpRequest) -> Option<&str> {
    request_host(req.uri(), req.headers().get(header::HOST), req.version())
        .ok()
        .flatten()
}

/// [`client_host`] as a header value: an absolute-form target's authority
/// (RFC 9112 §3.2.2), otherwise the `Host` header, reused without a copy.
pub(crate) fn client_host_value(req: &HttpRequest) -> Option<HeaderValue> {
    match req.uri().authority() {
        Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
        None => req.headers().get(header::HOST).cloned(),
    }
}

/// The upstream's answer as the client's response: status, headers less
/// hop-by-hop, `Server` and `X-Powered-By`, redirects back through the
/// gateway, and the body as a stream.
fn client_response(
    mut upstream: awc::ClientResponse,
    req: &HttpRequest,
    route: &Route,
    instance: &Instance,
    gateway: &Gateway,
) -> HttpResponse {
    let method = req.method();
    let status = upstream.status();
    let declared_length = upstream
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.trim().parse::<u64>().ok());
    let payload = IdleTimeout::new(upstream.take_payload(), gateway.body_idle_timeout);
    let bodiless = method == Method::HEAD
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational()
        || status == StatusCode::NO_CONTENT;

    let body = match (bodiless, declared_length) {
        // HEAD keeps the length the upstream declared; actix writes no body.
        (true, Some(length)) if method == Method::HEAD => BoxBody::new(SizedStream::new(length, EmptyStream)),
        (true, _) => BoxBody::new(http_body::None::new()),
        (false, Some(length)) => BoxBody::new(SizedStream::new(length, payload)),
        (false, None) => BoxBody::new(http_body::BodyStream::new(payload)),
    };

    let mut response = HttpResponse::with_body(status, body);
    if !bodiless && declared_length.is_none() && req.version() == Version::HTTP_10 {
        // HTTP/1.0 has no chunked coding (RFC 9112 §6.1): the body ends
        // when the connection does.
        let head = response.head_mut();
        head.no_chunking(true);
        head.set_connection_type(ConnectionType::Close);
    }
    let named = connection_named(upstream.headers());
    let headers = response.headers_mut();
    // Room for the upstream's headers and the gateway's own (security,
    // request id, rate limit) without the map growing several times.
    headers.reserve(upstream.headers().len() + GATEWAY_RESPONSE_HEADERS);
    for (name, value) in upstream.headers().iter() {
        if is_hop_by_hop(name)
            || name == header::CONTENT_LENGTH
            || name == header::SERVER
            || name == X_POWERED_BY
            || is_named(&named, name)
        {
            continue;
        }
        if (name == header::LOCATION || name == header::CONTENT_LOCATION) && !route.preserve_host {
            if let Some(rewritten) = rewrite_location(value, req, route, instance, gateway) {
                headers.append(name.clone(), rewritten);
                continue;
            }
        }
        headers.append(name.clone(), value.clone());
    }
    if status == StatusCode::NOT_MODIFIED {
        if let Some(length) = declared_length.and_then(|length| HeaderValue::from_str(&length.to_string()).ok()) {
            headers.insert(header::CONTENT_LENGTH, length);
        }
    }
    response
}

/// A `Location` (or `Content-Location`) pointing at the instance, rewritten
/// to the address the client used, as nginx's default `proxy_redirect`: the
/// instance's URL becomes `<X-Forwarded-Proto>://<host>`, and under
/// `strip_prefix` the route's prefix goes back in front of the path (of a
/// root-relative value too). `None` leaves the value as the upstream sent it.
fn rewrite_location(
    value: &HeaderValue,
    req: &HttpRequest,
    route: &Route,
    instance: &Instance,
    gateway: &Gateway,
) -> Option<HeaderValue> {
    let text = value.to_str().ok()?;
    let prefix = if route.strip_prefix {
        route.prefix.trim_end_matches('/')
    } else {
        ""
    };
    let (rest, origin) = if let Some(rest) = strip_instance_url(text, instance) {
        let origin = client_host(req).map(|host| (forwarded_proto(req, gateway), host));
        (rest, origin)
    } else if route.strip_prefix && text.starts_with('/') && !text.starts_with("//") {
        (strip_base_path(text, &instance.base_path).unwrap_or(text), None)
    } else {
        return None;
    };
    let path_slash = if rest.starts_with('/') { "" } else { "/" };
    let path = format!("{prefix}{path_slash}{rest}");
    let rewritten = match origin {
        Some((proto, host)) => format!("{proto}://{host}{path}"),
        // A root-relative value must stay on this host: `//x` or `/\x`
        // (what `/v1//x` becomes without its base path) would leave it.
        None if path.starts_with("//") || path.starts_with("/\\") => {
            format!("/{}", path.trim_start_matches(['/', '\\']))
        }
        None => path,
    };
    HeaderValue::from_str(&rewritten).ok()
}

/// What follows the instance's URL (scheme, authority, base path) in `url`,
/// if `url` is on the instance: empty or starting with `/`, `?` or `#`.
fn strip_instance_url<'a>(url: &'a str, instance: &Instance) -> Option<&'a str> {
    let (scheme, rest) = url.split_once("://")?;
    if !scheme.eq_ignore_ascii_case(instance.scheme.as_str()) {
        return None;
    }
    let authority = instance.authority.as_str();
    let on_instance = rest.get(..authority.len())?;
    if !on_instance.eq_ignore_ascii_case(authority) {
        return None;
    }
    let mut rest = &rest[authority.len()..];
    if instance.authority.port().is_none() {
        // The URL parser drops a default port from the instance's URL; the
        // instance may still spell it out.
        let default_port = if instance.scheme == Scheme::HTTPS {
            ":443"
        } else {
            ":80"
        };
        rest = rest.strip_prefix(default_port).unwrap_or(rest);
    }
    strip_base_path(rest, &instance.base_path)
}

/// `path` without the instance's base path, on a segment boundary.
fn strip_base_path<'a>(path: &'a str, base_path: &str) -> Option<&'a str> {
    let rest = path.strip_prefix(base_path)?;
    (rest.is_empty() || rest.starts_with(['/', '?', '#'])).then_some(rest)
}

/// The scheme the client used, as `X-Forwarded-Proto` tells the instance: a
/// trusted proxy's own value, else the listener's scheme.
fn forwarded_proto(req: &HttpRequest, gateway: &Gateway) -> &'static str {
    let trusted_peer = req.peer_addr().is_some_and(|peer| gateway.is_trusted_proxy(peer.ip()));
    match req.headers().get(&X_FORWARDED_PROTO).map(HeaderValue::as_bytes) {
        Some(b"https") if trusted_peer => "https",
        Some(b"http") if trusted_peer => "http",
        _ => listener_scheme(req),
    }
}

pin_project_lite::pin_project! {
    /// The upstream's body, failing when no bytes arrive for
    /// `upstream.body_idle_timeout_ms` (as nginx's `proxy_read_timeout`), so
    /// a stalled upstream cannot hold the client's connection forever; the
    /// failure closes the client's connection, so the client sees the body
    /// truncated. The timer is only created the first time the body has to
    /// wait: bodies that arrive with their head cost nothing.
    struct IdleTimeout<S> {
        #[pin]
        inner: S,
        // `None`: the body may pause for ever.
        limit: Option<Duration>,
        #[pin]
        timer: Option<actix_rt::time::Sleep>,
    }
}

impl<S> IdleTimeout<S> {
    fn new(inner: S, limit: Option<Duration>) -> Self {
        Self {
            inner,
            limit,
            timer: None,
        }
    }
}

impl<S: Stream<Item = Result<Bytes, PayloadError>>> Stream for IdleTimeout<S> {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        match this.inner.poll_next(cx) {
            Poll::Ready(item) => {
                if let (Some(timer), Some(limit)) = (this.timer.as_mut().as_pin_mut(), *this.limit) {
                    timer.reset((Instant::now() + limit).into());
                }
                Poll::Ready(item)
            }
            Poll::Pending => {
                let Some(limit) = *this.limit else {
                    return Poll::Pending;
                };
                if this.timer.is_none() {
                    this.timer.set(Some(actix_rt::time::sleep(limit)));
                }
                let timer = this.timer.as_pin_mut().expect("set above");
                match timer.poll(cx) {
                    Poll::Ready(()) => {
                        tracing::warn!(limit = ?this.limit, "upstream body stalled; closing the response");
                        Poll::Ready(Some(Err(PayloadError::Io(std::io::ErrorKind::TimedOut.into()))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

struct EmptyStream;

impl Stream for EmptyStream {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(None)
    }
}

/// The client's body as it will be sent upstream.
enum RequestBody {
    /// No body and no length: nothing is framed.
    None,
    /// An explicit `Content-Length: 0`, kept (some servers want a length on POST).
    Empty,
    /// Declared `Content-Length`: sent with the same length.
    Sized(u64, CappedPayload),
    /// Chunked: sent chunked, capped while it streams.
    Chunked(CappedPayload),
}

/// The client's request body as actix-web hands it over.
type ClientBody = actix_web::dev::Payload;

/// HTTP/2 bodies declared this long or shorter are read whole before the
/// request is forwarded.
const H2_HELD_BODY_BYTES: u64 = 64 * 1024;

/// An HTTP/2 request's body, made ready to forward (SPEC §8). A body with a
/// declared length up to [`H2_HELD_BODY_BYTES`] is read whole first: when
/// its DATA frames disagree with its `content-length`, h2 refuses the stream
/// and nothing has reached an instance (a longer one is streamed, and such a
/// mismatch cuts the upstream request short, so the instance never sees a
/// complete request). Without a `content-length`, a request that has a body
/// is told from one that has none (END_STREAM on its headers) by waiting for
/// the first DATA frame; the body is then forwarded chunked. The wait is
/// bounded by the request timeout.
async fn h2_body(
    req: &HttpRequest,
    mut payload: ClientBody,
    deadline: Instant,
) -> Result<(Framing, ClientBody), GatewayError> {
    use futures_util::StreamExt;

    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse::<u64>().ok());
    let refused = |reason: &str| {
        tracing::debug!(reason, "HTTP/2 request body refused");
        GatewayError::BadRequest("invalid body")
    };
    let read = async {
        match declared {
            Some(0) => Ok((Framing::Empty, payload)),
            Some(length) if length <= H2_HELD_BODY_BYTES => {
                let mut body = bytes::BytesMut::with_capacity(length as usize);
                while let Some(chunk) = payload.next().await {
                    body.extend_from_slice(&chunk.map_err(|_| refused("malformed"))?);
                }
                if body.len() as u64 != length {
                    return Err(refused("length disagrees with content-length"));
                }
                Ok((Framing::Sized(length), ClientBody::from(body.freeze())))
            }
            Some(length) => Ok((Framing::Sized(length), payload)),
            None => match payload.next().await {
                None => Ok((Framing::None, ClientBody::None)),
                Some(Err(_)) => Err(refused("malformed")),
                Some(Ok(first)) => {
                    let rest = futures_util::stream::once(std::future::ready(Ok(first))).chain(payload);
                    let stream: actix_http::BoxedPayloadStream = Box::pin(rest);
                    Ok((Framing::Chunked, ClientBody::from(stream)))
                }
            },
        }
    };
    actix_rt::time::timeout(deadline.saturating_duration_since(Instant::now()), read)
        .await
        .unwrap_or_else(|_| Err(refused("timeout")))
}

/// How a request body is framed, without the body.
#[derive(Debug, Clone, Copy)]
enum Framing {
    None,
    Empty,
    Sized(u64),
    Chunked,
}

impl RequestBody {
    fn of(req: &HttpRequest, payload: ClientBody, limit: u64) -> Self {
        let length = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|text| text.parse::<u64>().ok());
        let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
        let framing = match (length, chunked) {
            (None, false) => Framing::None,
            (Some(0), false) => Framing::Empty,
            (Some(length), false) => Framing::Sized(length),
            (_, true) => Framing::Chunked,
        };
        Self::with(framing, payload, limit)
    }

    fn with(framing: Framing, payload: ClientBody, limit: u64) -> Self {
        match framing {
            Framing::None => Self::None,
            Framing::Empty => Self::Empty,
            Framing::Sized(length) => Self::Sized(length, CappedPayload::new(payload, limit)),
            Framing::Chunked => Self::Chunked(CappedPayload::new(payload, limit)),
        }
    }

    fn framing(&self) -> Framing {
        match self {
            Self::None => Framing::None,
            Self::Empty => Framing::Empty,
            Self::Sized(length, _) => Framing::Sized(*length),
            Self::Chunked(_) => Framing::Chunked,
        }
    }

    fn progress(&self) -> Option<Rc<BodyProgress>> {
        match self {
            Self::None | Self::Empty => None,
            Self::Sized(_, stream) | Self::Chunked(stream) => Some(stream.progress.clone()),
        }
    }
}

/// How far the client's body got, seen by the code that classifies failures.
#[derive(Default)]
struct BodyProgress {
    /// More than `max_body_bytes` arrived.
    overflowed: Cell<bool>,
    /// The whole body was read from the client.
    finished: Cell<bool>,
    /// The client's body, handed back by a stream that awc dropped without
    /// reading a byte (the connection never came up), for the next instance.
    untouched: Cell<Option<ClientBody>>,
}

/// The client's body stream, failing once more than `remaining` bytes arrive.
struct CappedPayload {
    /// Always `Some` until dropped.
    inner: Option<ClientBody>,
    remaining: u64,
    /// Something was taken from `inner` (a chunk, an error or the end).
    polled: bool,
    progress: Rc<BodyProgress>,
}

impl CappedPayload {
    fn new(inner: ClientBody, limit: u64) -> Self {
        Self {
            inner: Some(inner),
            remaining: limit,
            polled: false,
            progress: Rc::default(),
        }
    }
}

impl Drop for CappedPayload {
    fn drop(&mut self) {
        if !self.polled {
            self.progress.untouched.set(self.inner.take());
        }
    }
}

impl Stream for CappedPayload {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let item = std::task::ready!(Pin::new(inner).poll_next(cx));
        this.polled = true;
        match item {
            Some(Ok(chunk)) => {
                let size = chunk.len() as u64;
                if size > this.remaining {
                    this.progress.overflowed.set(true);
                    return Poll::Ready(Some(Err(PayloadError::Overflow)));
                }
                this.remaining -= size;
                Poll::Ready(Some(Ok(chunk)))
            }
            None => {
                this.progress.finished.set(true);
                Poll::Ready(None)
            }
            other => Poll::Ready(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_lists_only_the_names_that_are_not_hop_by_hop_anyway() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        assert!(connection_named(&headers).is_empty());
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static("close, TE, X-Secret ,, upgrade"),
        );
        let named = connection_named(&headers);
        assert_eq!(named, ["close", "X-Secret"]);
        assert!(is_named(&named, &HeaderName::from_static("x-secret")));
        assert!(!is_named(&named, &HeaderName::from_static("x-other")));
    }

    #[test]
    fn the_hop_by_hop_names_as_text_are_those_of_is_hop_by_hop() {
        for name in HOP_BY_HOP_NAMES {
            assert!(is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
            assert!(is_hop_by_hop_name(&name.to_ascii_uppercase()), "{name}");
        }
        assert!(!is_hop_by_hop_name("x-secret"));
    }

    fn instance(scheme: Scheme, authority: &str, base_path: &str) -> Instance {
        Instance {
            url: format!("{scheme}://{authority}{base_path}"),
            scheme,
            authority: authority.parse().unwrap(),
            base_path: base_path.to_owned(),
            host: HeaderValue::from_str(authority).unwrap(),
        }
    }

    #[test]
    fn a_url_is_on_the_instance_when_scheme_authority_and_base_path_match() {
        let plain = instance(Scheme::HTTP, "10.0.0.5:3001", "");
        let based = instance(Scheme::HTTP, "app.internal", "/v1");
        let tls = instance(Scheme::HTTPS, "app.internal", "");
        let cases: &[(&Instance, &str, Option<&str>)] = &[
            (&plain, "http://10.0.0.5:3001/x?y", Some("/x?y")),
            (&plain, "HTTP://10.0.0.5:3001", Some("")),
            (&plain, "http://10.0.0.5:30011/x", None),
            (&plain, "https://10.0.0.5:3001/x", None),
            (&plain, "http://10.0.0.6:3001/x", None),
            (&based, "http://APP.internal/v1/x", Some("/x")),
            (&based, "http://app.internal:80/v1/x", Some("/x")),
            (&based, "http://app.internal/v1?q", Some("?q")),
            (&based, "http://app.internal/v10/x", None),
            (&based, "http://app.internal/x", None),
            (&tls, "https://app.internal:443/x", Some("/x")),
            (&tls, "https://app.internal:80/x", None),
        ];
        for (instance, url, expected) in cases {
            assert_eq!(
                strip_instance_url(url, instance),
                *expected,
                "{url} on {}",
                instance.url
            );
        }
    }

    #[test]
    fn underscore_spellings_of_framing_headers_are_never_forwarded() {
        for name in [
            "transfer_encoding",
            "content_length",
            "keep_alive",
            "x_user_id",
            "proxy_connection",
        ] {
            let name = HeaderName::from_static(name);
            assert!(is_gateway_owned(&name, false), "{name}");
        }
        assert!(!is_gateway_owned(&HeaderName::from_static("x_custom"), false));
        for name in [
            header::CONNECTION,
            KEEP_ALIVE,
            header::PROXY_AUTHENTICATE,
            header::PROXY_AUTHORIZATION,
            header::TE,
            header::TRAILER,
            header::TRANSFER_ENCODING,
            header::UPGRADE,
            PROXY_CONNECTION,
        ] {
            assert!(is_hop_by_hop(&name) && is_hop_by_hop_name(name.as_str()), "{name}");
        }
    }
}
