//! Steps 2–3 of the pipeline: refuse oversized request lines (414) and heads
//! (431), hosts that are not `host[:port]` (400) and bodies that declare too
//! much (413), normalize the path (400), then decide what the
//! request is for. The decision goes into the request's extensions as a
//! [`Routed`], which the rate-limit and auth layers read and the dispatch
//! handler acts on; 404 and 405 are answered there, after the limits.

use std::future::{ready, Ready};
use std::rc::Rc;
use std::sync::Arc;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::Method;
use actix_web::{Error, HttpMessage};
use futures_util::future::Either;

use crate::cors::is_preflight;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::middleware::cors::WithCors;
use crate::middleware::{passthrough, Passthrough};
use crate::routing::{
    host_name, normalize_path, normalize_path_keeping_encoded_slashes, request_host, InvalidPath, Route, RouteMatch,
    ALLOW_OF_AN_OPEN_ROUTE,
};
use crate::worker::{Snapshot, WorkerContext};

/// What a request is for, decided once.
#[derive(Debug, Clone)]
pub enum Target {
    Health,
    Metrics,
    Route(Arc<Route>),
    /// A CORS preflight for a route with a CORS policy: answered by the
    /// gateway after the address-keyed limits, never authenticated or
    /// forwarded (SPEC §10).
    Preflight(Arc<Route>),
    NotFound,
    MethodNotAllowed(HeaderValue),
}

/// The normalized path, the request's target, and the configuration the
/// request uses from start to end.
#[derive(Clone)]
pub struct Routed {
    /// `None` when the raw path was already normal.
    normalized: Option<String>,
    pub target: Target,
    pub snapshot: Rc<Snapshot>,
}

impl Routed {
    /// The normalized path: the one matched and the one forwarded.
    pub fn path<'a>(&'a self, raw: &'a str) -> &'a str {
        self.normalized.as_deref().unwrap_or(raw)
    }

    /// The route the request is forwarded on.
    pub fn route(&self) -> Option<&Arc<Route>> {
        match &self.target {
            Target::Route(route) => Some(route),
            _ => None,
        }
    }

    /// The route the request belongs to: the one it is forwarded on, or the
    /// one a preflight asks about.
    pub fn matched_route(&self) -> Option<&Arc<Route>> {
        match &self.target {
            Target::Route(route) | Target::Preflight(route) => Some(route),
            _ => None,
        }
    }
}

/// Approximate size of the request line on the wire.
fn request_line_size(req: &ServiceRequest) -> usize {
    let uri = req.uri();
    let target = uri.scheme_str().map_or(0, |scheme| scheme.len() + 3)
        + uri.authority().map_or(0, |authority| authority.as_str().len())
        + uri.path_and_query().map_or(1, |pq| pq.as_str().len());
    req.method().as_str().len() + 1 + target + 1 + "HTTP/1.1\r\n".len()
}

/// Approximate size of the header lines and the blank line after them.
fn header_lines_size(req: &ServiceRequest) -> usize {
    let headers: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    headers + 2
}

fn declared_length(req: &ServiceRequest) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse().ok())
}

fn classify(req: &ServiceRequest, snapshot: Rc<Snapshot>) -> Result<Routed, GatewayError> {
    let gateway: &Gateway = &snapshot.gateway;
    let request_line = request_line_size(req);
    if request_line > gateway.max_header_bytes {
        return Err(GatewayError::UriTooLong);
    }
    if request_line + header_lines_size(req) > gateway.max_header_bytes {
        return Err(GatewayError::HeaderFieldsTooLarge);
    }
    let host = match request_host(req.uri(), req.headers().get(header::HOST), req.version()) {
        Ok(host) => host.map(host_name),
        Err(err) => {
            tracing::debug!(host = ?req.headers().get(header::HOST), reason = %err, "host refused");
            return Err(GatewayError::BadRequest("invalid host"));
        }
    };
    let refuse_path = |err: InvalidPath| {
        tracing::debug!(path = req.path(), reason = %err, "path refused");
        GatewayError::BadRequest("invalid path")
    };
    let (normalized, keeps_encoded_slashes) = match normalize_path(req.path()) {
        Ok(normalized) => (normalized, false),
        Err(InvalidPath::EncodedSlash) if gateway.any_route_allows_encoded_slash => (
            normalize_path_keeping_encoded_slashes(req.path()).map_err(refuse_path)?,
            true,
        ),
        // An authority-form target (`CONNECT host:443`) has no path to route.
        Err(InvalidPath::NotAbsolute) if req.method() == Method::CONNECT => {
            return Ok(Routed {
                normalized: None,
                target: Target::MethodNotAllowed(ALLOW_OF_AN_OPEN_ROUTE),
                snapshot,
            });
        }
        Err(err) => return Err(refuse_path(err)),
    };
    if declared_length(req).is_some_and(|length| length > gateway.max_body_bytes) {
        return Err(GatewayError::PayloadTooLarge);
    }
    let target = match &*normalized {
        "/health" => Target::Health,
        "/metrics" => Target::Metrics,
        path => match preflight_route(req, gateway, path, host) {
            Some(route) => Target::Preflight(route.clone()),
            None => match gateway.routes.lookup(path, host, req.method()) {
                RouteMatch::Found(route) => Target::Route(route.clone()),
                RouteMatch::MethodNotAllowed(allow) => Target::MethodNotAllowed(allow),
                RouteMatch::NotFound => Target::NotFound,
            },
        },
    };
    if keeps_encoded_slashes && !matches!(&target, Target::Route(route) if route.allow_encoded_slash) {
        return Err(refuse_path(InvalidPath::EncodedSlash));
    }
    if let Target::Route(route) | Target::Preflight(route) = &target {
        tracing::Span::current().record("route", &*route.name);
    }
    let normalized = match normalized {
        std::borrow::Cow::Borrowed(_) => None,
        std::borrow::Cow::Owned(path) => Some(path),
    };
    Ok(Routed {
        normalized,
        target,
        snapshot,
    })
}

/// The route a CORS preflight asks about, when it has a CORS policy: the
/// route matching the path and host whatever its `methods` (SPEC §10).
fn preflight_route<'a>(
    req: &ServiceRequest,
    gateway: &'a Gateway,
    path: &str,
    host: Option<&str>,
) -> Option<&'a Arc<Route>> {
    if !gateway.any_route_has_cors || !is_preflight(req.method(), req.headers()) {
        return None;
    }
    gateway
        .routes
        .lookup_any_method(path, host)
        .filter(|route| route.cors.is_some())
}

pub struct RouteMatcher {
    worker: Rc<WorkerContext>,
}

impl RouteMatcher {
    pub fn new(worker: Rc<WorkerContext>) -> Self {
        Self { worker }
    }
}

impl<S, B> Transform<S, ServiceRequest> for RouteMatcher
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Transform = RouteMatcherService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(RouteMatcherService {
            service: Rc::new(service),
            worker: self.worker.clone(),
        }))
    }
}

pub struct RouteMatcherService<S> {
    service: Rc<S>,
    worker: Rc<WorkerContext>,
}

impl<S, B> Service<ServiceRequest> for RouteMatcherService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Future = Either<WithCors<Passthrough<S::Future, B>>, Ready<Result<Self::Response, Self::Error>>>;

    actix_web::dev::forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        match classify(&req, self.worker.snapshot()) {
            Ok(routed) => {
                // Only a route with a policy is kept (an `Arc` clone).
                let cors = routed.matched_route().filter(|route| route.cors.is_some()).cloned();
                req.extensions_mut().insert(routed);
                Either::Left(WithCors::new(passthrough(self.service.call(req)), cors))
            }
            Err(error) => Either::Right(ready(Ok(req.error_response(error).map_into_right_body()))),
        }
    }
}
