//! One HTTP worker: what it reads while serving ([`WorkerContext`]), how its
//! App is put together ([`Workers::app`]), and the one handler.
//!
//! actix-web calls [`Workers::app`] once per worker thread, on that worker's
//! own arbiter: the balancer actor, the awc clients and the rate limiter's
//! connection it builds live beside the requests that use them (awc clients
//! are not `Send`).

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr};
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::{web, App, Error, HttpMessage, HttpRequest, HttpResponse};
use tracing_actix_web::TracingLogger;

use crate::actors::balancer::{BalancerActor, SharedCursors};
use crate::actors::registry::{PassiveFailures, RegistryActor, SubscribeBalancer};
use crate::auth::Verifier;
use crate::endpoints;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::middleware::auth::Authentication;
use crate::middleware::body_check::BodyCheck;
use crate::middleware::connection_watch::ConnectionWatch;
use crate::middleware::rate_limit::{RateLimit, Stage};
use crate::middleware::request_id::RequestIds;
use crate::middleware::route_match::{RouteMatcher, Routed, Target};
use crate::middleware::security_headers::SecurityHeaders;
use crate::proxy;
use crate::ratelimit::{RateLimiter, SharedLimits};
use crate::settings::{RateLimitSettings, UpstreamSettings};
use crate::telemetry::GatewayRootSpan;

/// Connections kept idle in each worker's upstream pool this long.
const UPSTREAM_KEEP_ALIVE: Duration = Duration::from_secs(30);

/// Everything one HTTP worker needs to forward; built once per worker.
pub struct WorkerContext {
    pub gateway: Arc<Gateway>,
    /// One client per instance (`[service][instance]`), each with its own
    /// pool of keep-alive connections capped at `max_connections_per_host`,
    /// so one slow instance cannot take the connections of another.
    pub clients: Vec<Vec<awc::Client>>,
    /// This worker's balancer, on this worker's arbiter.
    pub balancer: Addr<BalancerActor>,
    pub registry: Addr<RegistryActor>,
    pub passive: Arc<PassiveFailures>,
}

/// What every worker is built from: the compiled configuration and the
/// process-wide actors and counters, shared by all workers.
pub struct Workers {
    pub gateway: Arc<Gateway>,
    /// `None` when no route needs auth.
    pub verifier: Option<Arc<Verifier>>,
    pub rate_limit: RateLimitSettings,
    pub shared_limits: SharedLimits,
    pub upstream: UpstreamSettings,
    pub registry: Addr<RegistryActor>,
    pub passive: Arc<PassiveFailures>,
    pub cursors: SharedCursors,
}

impl Workers {
    /// One worker's App: its balancer, clients and limiter, and the
    /// middleware stack of SPEC §3 around the dispatch handler.
    pub fn app(
        &self,
    ) -> App<
        impl ServiceFactory<
            ServiceRequest,
            Config = (),
            Response = ServiceResponse<impl MessageBody>,
            Error = Error,
            InitError = (),
        >,
    > {
        let gateway = &self.gateway;
        let instance_counts: Vec<usize> = gateway.services.iter().map(|s| s.instances.len()).collect();
        let balancer = BalancerActor::new(&instance_counts, self.cursors.clone()).start();
        self.registry.do_send(SubscribeBalancer(balancer.clone().recipient()));
        let context = WorkerContext {
            gateway: gateway.clone(),
            clients: gateway
                .services
                .iter()
                .map(|service| {
                    service
                        .instances
                        .iter()
                        .map(|_| upstream_client(&self.upstream))
                        .collect()
                })
                .collect(),
            balancer,
            registry: self.registry.clone(),
            passive: self.passive.clone(),
        };
        let limiter =
            Rc::new(RateLimiter::new(&self.rate_limit, &self.shared_limits).expect("checked before the workers start"));
        App::new()
            .app_data(web::Data::new(context))
            .default_service(web::to(dispatch))
            .wrap(RateLimit::new(Stage::User, gateway.clone(), limiter.clone()))
            .wrap(Authentication::new(self.verifier.clone()))
            .wrap(RateLimit::new(Stage::Address, gateway.clone(), limiter))
            .wrap(RouteMatcher::new(gateway.clone()))
            .wrap(BodyCheck)
            .wrap(TracingLogger::<GatewayRootSpan>::new())
            .wrap(RequestIds)
            .wrap(SecurityHeaders {
                some_route_opts_out: gateway.any_route_drops_security_headers,
            })
            .wrap(ConnectionWatch)
    }
}

fn upstream_client(upstream: &UpstreamSettings) -> awc::Client {
    let connector = awc::Connector::new()
        .timeout(Duration::from_millis(upstream.connect_timeout_ms))
        .limit(upstream.max_connections_per_host)
        .conn_keep_alive(UPSTREAM_KEEP_ALIVE)
        .max_http_version(awc::http::Version::HTTP_11);
    awc::Client::builder()
        .connector(connector)
        .disable_redirects()
        .no_default_headers()
        .timeout(Duration::from_millis(upstream.request_timeout_ms))
        .finish()
}

/// The one handler: answers what the route matcher decided.
async fn dispatch(
    req: HttpRequest,
    payload: web::Payload,
    context: web::Data<WorkerContext>,
) -> Result<HttpResponse, GatewayError> {
    // Cloned, not taken: the request log and metrics read it afterwards.
    let routed = req
        .extensions()
        .get::<Routed>()
        .cloned()
        .ok_or_else(|| GatewayError::Internal("request reached dispatch unrouted".to_owned()))?;
    match &routed.target {
        Target::Health => endpoints::health(req.method(), &context).await,
        Target::Metrics => endpoints::metrics(req.method()).await,
        Target::NotFound => Err(GatewayError::NotFound),
        Target::MethodNotAllowed(allow) => Err(GatewayError::MethodNotAllowed { allow: allow.clone() }),
        Target::Route(route) => proxy::forward(&req, payload, route, routed.path(req.path()), &context).await,
    }
}
