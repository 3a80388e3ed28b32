//! One HTTP worker: the configuration it serves ([`WorkerContext`], one
//! [`Snapshot`] per generation), how its App is put together
//! ([`Workers::app`]), and the one handler.
//!
//! actix-web calls [`Workers::app`] once per worker thread, on that worker's
//! own arbiter: the balancer actor, the awc clients and the rate limiter's
//! connection it builds live beside the requests that use them (awc clients
//! are not `Send`).
//!
//! A request takes the worker's current snapshot once, when it is routed, and
//! keeps it to the end (it travels in the request's [`Routed`]); a reload
//! replaces the worker's current snapshot on the worker's own thread, so
//! requests read their configuration with no lock and no atomic, and one in
//! flight finishes on the configuration it started with.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, AsyncContext};
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::{web, App, Error, HttpMessage, HttpRequest, HttpResponse};
use tracing_actix_web::TracingLogger;

use crate::actors::balancer::{pick_round_robin, BalancerActor, PickTarget, SwappedOut};
use crate::actors::registry::{Deployment, PassiveFailures, RegistryActor, SubscribeBalancer};
use crate::auth::{TokenCache, Verifier};
use crate::endpoints;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::middleware::access::Access;
use crate::middleware::body_check::BodyCheck;
use crate::middleware::connection_watch::ConnectionWatch;
use crate::middleware::cors::preflight_response;
use crate::middleware::request_id::RequestIds;
use crate::middleware::route_match::{RouteMatcher, Routed, Target};
use crate::middleware::security_headers::SecurityHeaders;
use crate::proxy;
use crate::ratelimit::{RateLimiter, SharedLimits};
use crate::settings::{RateLimitSettings, UpstreamSettings};
use crate::telemetry::GatewayRootSpan;
use crate::websocket::{self, tunnel_opener, TunnelOpener, TunnelShutdown};

/// Connections kept idle in each worker's upstream pool this long.
const UPSTREAM_KEEP_ALIVE: Duration = Duration::from_secs(30);

/// One worker's configuration in force; only its own thread touches it.
pub struct WorkerContext {
    current: RefCell<Rc<Snapshot>>,
    registry: Addr<RegistryActor>,
    balancer: Addr<BalancerActor>,
    shared_limits: SharedLimits,
}

/// One worker's view of one configuration generation: the compiled
/// configuration, and what the worker built for it (clients, limiter, token
/// cache, healthy sets).
pub struct Snapshot {
    pub generation: u64,
    pub gateway: Arc<Gateway>,
    /// `None` when no route needs auth.
    pub verifier: Option<Arc<Verifier>>,
    /// This worker's verified tokens; kept across reloads that keep the
    /// verifier, dropped with it.
    pub tokens: Rc<TokenCache>,
    pub limiter: Rc<RateLimiter>,
    pub registry: Addr<RegistryActor>,
    /// This worker's balancer, on this worker's arbiter.
    pub balancer: Addr<BalancerActor>,
    pub passive_threshold: u32,
    /// `services[s]` is `gateway.services[s]`.
    services: Vec<ServiceUpstreams>,
    /// Opens WebSocket tunnels to every instance. A tunnel's connection never
    /// goes back to a pool, and through an instance's pooled client it would
    /// hold one of its connection permits while it lasts: so tunnels have a
    /// connector of their own, with no cap, and the request pools stay whole.
    pub tunnels: TunnelOpener,
    upstream: UpstreamSettings,
    rate_limit: RateLimitSettings,
}

struct ServiceUpstreams {
    /// Positions of the healthy instances; the balancer replaces it.
    healthy: RefCell<Arc<[usize]>>,
    cursor: Arc<AtomicUsize>,
    instances: Vec<Upstream>,
}

/// What a worker holds for one instance.
pub struct Upstream {
    /// Its own pool of keep-alive connections capped at
    /// `max_connections_per_host`, so one slow instance cannot take the
    /// connections of another; kept across reloads while the URL is.
    pub client: awc::Client,
    pub failures: Arc<PassiveFailures>,
}

impl Snapshot {
    /// The next instance of `service` in rotation, asked of the worker's
    /// balancer; picked here if a reload has swapped this snapshot out
    /// meanwhile, so the instance is always one of this snapshot's.
    pub async fn pick_target(&self, service: usize, exclude: Option<usize>) -> Option<usize> {
        let asked = self.balancer.send(PickTarget {
            generation: self.generation,
            service,
            exclude,
        });
        match asked.await {
            Ok(Ok(target)) => target,
            Ok(Err(SwappedOut)) | Err(_) => self.pick(service, exclude),
        }
    }

    /// The next instance of `service` in rotation (see [`pick_round_robin`]).
    pub fn pick(&self, service: usize, exclude: Option<usize>) -> Option<usize> {
        let upstreams = &self.services[service];
        let healthy = upstreams.healthy.borrow();
        pick_round_robin(&healthy, &upstreams.cursor, exclude)
    }

    pub fn upstream(&self, service: usize, instance: usize) -> &Upstream {
        &self.services[service].instances[instance]
    }

    /// Builds this worker's view of `deployment`, keeping from `previous`
    /// what is unchanged: the client (and pooled connections) of every
    /// instance whose service and URL stay, the token cache while the
    /// verifier stays, and the limiter (and its Redis connection) while its
    /// settings stay.
    fn build(
        deployment: &Deployment,
        healthy: Vec<Arc<[usize]>>,
        previous: Option<&Snapshot>,
        registry: &Addr<RegistryActor>,
        balancer: &Addr<BalancerActor>,
        shared_limits: &SharedLimits,
    ) -> Self {
        let gateway = &deployment.gateway;
        let mut kept_clients: HashMap<(&str, &str), &awc::Client> = HashMap::new();
        let same_clients = |previous: &&Snapshot| {
            previous.upstream == deployment.upstream
                && Arc::ptr_eq(&previous.gateway.upstream_tls, &gateway.upstream_tls)
        };
        if let Some(previous) = previous.filter(same_clients) {
            for (service, upstreams) in previous.gateway.services.iter().zip(&previous.services) {
                for (instance, upstream) in service.instances.iter().zip(&upstreams.instances) {
                    kept_clients.insert((&service.name, &instance.url), &upstream.client);
                }
            }
        }
        let new_client = || upstream_client(&deployment.upstream, gateway.upstream_tls.clone());
        let tunnels = previous.filter(same_clients).map_or_else(
            || {
                tunnel_opener(
                    Duration::from_millis(deployment.upstream.connect_timeout_ms),
                    gateway.upstream_tls.clone(),
                )
            },
            |previous| previous.tunnels.clone(),
        );
        let services = gateway
            .services
            .iter()
            .zip(&deployment.services)
            .zip(healthy)
            .map(|((service, deployed), healthy)| ServiceUpstreams {
                healthy: RefCell::new(healthy),
                cursor: deployed.cursor.clone(),
                instances: service
                    .instances
                    .iter()
                    .zip(&deployed.instances)
                    .map(|(instance, failures)| Upstream {
                        client: kept_clients
                            .get(&(&*service.name, instance.url.as_str()))
                            .map_or_else(new_client, |client| (*client).clone()),
                        failures: failures.clone(),
                    })
                    .collect(),
            })
            .collect();
        let same_verifier = |previous: &&Snapshot| match (&previous.verifier, &deployment.verifier) {
            (Some(before), Some(after)) => Arc::ptr_eq(before, after),
            (None, None) => true,
            _ => false,
        };
        let tokens = previous
            .filter(same_verifier)
            .map_or_else(Rc::default, |previous| previous.tokens.clone());
        let limiter = previous
            .filter(|previous| {
                same_limiter(&previous.rate_limit, &deployment.rate_limit)
                    && previous.gateway.redis_roots == gateway.redis_roots
            })
            .map_or_else(
                || {
                    Rc::new(
                        RateLimiter::new(&deployment.rate_limit, gateway.redis_roots.as_deref(), shared_limits)
                            .expect("the configuration compiled, so its limiter builds"),
                    )
                },
                |previous| previous.limiter.clone(),
            );
        Self {
            generation: deployment.generation,
            gateway: gateway.clone(),
            verifier: deployment.verifier.clone(),
            tokens,
            limiter,
            registry: registry.clone(),
            balancer: balancer.clone(),
            passive_threshold: deployment.passive_threshold,
            services,
            tunnels,
            upstream: deployment.upstream.clone(),
            rate_limit: deployment.rate_limit.clone(),
        }
    }
}

/// The limiter's own settings (policies are read from each request's
/// snapshot) are the same.
fn same_limiter(before: &RateLimitSettings, after: &RateLimitSettings) -> bool {
    before.backend == after.backend
        && before.redis_url == after.redis_url
        && before.redis_cluster == after.redis_cluster
        && before.key_prefix == after.key_prefix
        && before.on_backend_error == after.on_backend_error
        && before.redis_timeout_ms == after.redis_timeout_ms
}

impl WorkerContext {
    fn new(
        deployment: &Deployment,
        registry: Addr<RegistryActor>,
        balancer: Addr<BalancerActor>,
        shared_limits: SharedLimits,
    ) -> Self {
        let healthy = deployment
            .gateway
            .services
            .iter()
            .map(|service| (0..service.instances.len()).collect())
            .collect();
        let snapshot = Snapshot::build(deployment, healthy, None, &registry, &balancer, &shared_limits);
        Self {
            current: RefCell::new(Rc::new(snapshot)),
            registry,
            balancer,
            shared_limits,
        }
    }

    /// The configuration a request starting now uses, to the end.
    pub fn snapshot(&self) -> Rc<Snapshot> {
        self.current.borrow().clone()
    }

    /// The next target of `service` in the snapshot in force, if it is still
    /// of `generation`.
    pub fn pick(&self, generation: u64, service: usize, exclude: Option<usize>) -> Result<Option<usize>, SwappedOut> {
        let current = self.current.borrow();
        if current.generation != generation {
            return Err(SwappedOut);
        }
        Ok(current.pick(service, exclude))
    }

    /// Applies a healthy-set change, if it is about the generation in force
    /// (one about an older generation was already superseded by a deploy).
    pub fn set_healthy(&self, generation: u64, service: usize, healthy: Arc<[usize]>) {
        let current = self.current.borrow();
        if current.generation == generation {
            if let Some(upstreams) = current.services.get(service) {
                *upstreams.healthy.borrow_mut() = healthy;
            }
        }
    }

    /// Puts `deployment` in force for every request that starts from now on.
    pub fn deploy(&self, deployment: &Deployment, healthy: Vec<Arc<[usize]>>) {
        let current = self.snapshot();
        if current.generation == deployment.generation {
            for (upstreams, healthy) in current.services.iter().zip(healthy) {
                *upstreams.healthy.borrow_mut() = healthy;
            }
            return;
        }
        let next = Snapshot::build(
            deployment,
            healthy,
            Some(&current),
            &self.registry,
            &self.balancer,
            &self.shared_limits,
        );
        *self.current.borrow_mut() = Rc::new(next);
        crate::metrics::forget_request_series();
    }
}

/// What every worker is built from: the start-up deployment and the
/// process-wide actors and state, shared by all workers.
pub struct Workers {
    pub deployment: Arc<Deployment>,
    pub shared_limits: SharedLimits,
    pub registry: Addr<RegistryActor>,
    pub tunnel_shutdown: TunnelShutdown,
}

impl Workers {
    /// One worker's App: its balancer and its configuration, and the
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
        let mut context = None;
        let balancer = BalancerActor::create(|ctx| {
            let worker = Rc::new(WorkerContext::new(
                &self.deployment,
                self.registry.clone(),
                ctx.address(),
                self.shared_limits.clone(),
            ));
            context = Some(worker.clone());
            BalancerActor::new(worker)
        });
        let context = context.expect("set by BalancerActor::create");
        self.registry.do_send(SubscribeBalancer(balancer));
        App::new()
            .app_data(self.tunnel_shutdown.clone())
            .default_service(web::to(dispatch))
            .wrap(Access)
            .wrap(RouteMatcher::new(context))
            .wrap(BodyCheck)
            .wrap(TracingLogger::<GatewayRootSpan>::new())
            .wrap(RequestIds)
            .wrap(SecurityHeaders)
            .wrap(ConnectionWatch)
    }
}

fn upstream_client(upstream: &UpstreamSettings, tls: Arc<rustls::ClientConfig>) -> awc::Client {
    let connector = awc::Connector::new()
        .timeout(Duration::from_millis(upstream.connect_timeout_ms))
        .limit(upstream.max_connections_per_host)
        .conn_keep_alive(UPSTREAM_KEEP_ALIVE)
        // One configuration shared by every client (awc's own is built per
        // client); its ALPN offers HTTP/1.1 only, which is all
        // `max_http_version` would change.
        .rustls_0_23(tls);
    awc::Client::builder()
        .connector(connector)
        .disable_redirects()
        .no_default_headers()
        .timeout(Duration::from_millis(upstream.request_timeout_ms))
        .finish()
}

/// The one handler: answers what the route matcher decided.
async fn dispatch(req: HttpRequest, payload: web::Payload) -> Result<HttpResponse, GatewayError> {
    // Cloned, not taken: the request log and metrics read it afterwards.
    let routed = req
        .extensions()
        .get::<Routed>()
        .cloned()
        .ok_or_else(|| GatewayError::Internal("request reached dispatch unrouted".to_owned()))?;
    let snapshot = &routed.snapshot;
    match &routed.target {
        Target::Health => endpoints::health(req.method(), snapshot).await,
        Target::Metrics => endpoints::metrics(req.method()).await,
        Target::NotFound => Err(GatewayError::NotFound),
        Target::MethodNotAllowed(allow) => Err(GatewayError::MethodNotAllowed { allow: allow.clone() }),
        Target::Preflight(route) => Ok(preflight_response(&req, route)),
        Target::Route(route) if route.websocket && websocket::is_websocket_upgrade(&req) => {
            websocket::tunnel(&req, payload, route, routed.path(req.path()), snapshot).await
        }
        Target::Route(route) => proxy::forward(&req, payload, route, routed.path(req.path()), snapshot).await,
    }
}
