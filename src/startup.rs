//! Wiring: bind the listener, start the actors, build each worker's App.
//!
//! [`Application::build`] binds first and keeps the real address, so tests can
//! listen on port 0; [`Application::run_until_stopped`] serves until the server
//! is stopped, and [`run`] adds the SIGTERM/SIGINT graceful drain.

use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use actix_web::dev::{Server, ServerHandle};
use actix_web::{web, App, HttpMessage, HttpRequest, HttpResponse, HttpServer};
use tracing_actix_web::TracingLogger;

use crate::actors::balancer::{shared_cursors, BalancerActor};
use crate::actors::health::HealthChecker;
use crate::actors::registry::{PassiveFailures, RegistryActor, SubscribeBalancer};
use crate::auth::Verifier;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::middleware::auth::Authentication;
use crate::middleware::body_check::BodyCheck;
use crate::middleware::connection_watch::{watch_connection, ConnectionWatch};
use crate::middleware::rate_limit::{RateLimit, Stage};
use crate::middleware::request_id::RequestIds;
use crate::middleware::route_match::{RouteMatcher, Routed, Target};
use crate::middleware::security_headers::SecurityHeaders;
use crate::proxy::{self, WorkerContext};
use crate::ratelimit::{RateLimiter, SharedLimits};
use crate::settings::Settings;
use crate::telemetry::GatewayRootSpan;
use crate::{endpoints, settings};

/// Connections kept idle in each worker's upstream pool this long.
const UPSTREAM_KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Idle keep-alive connections from clients are closed after this long.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Histogram upkeep period, so metrics memory stays flat between scrapes.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

pub struct Application {
    server: Server,
    address: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("server.listen: cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("cannot start the HTTP server: {0}")]
    Server(#[from] std::io::Error),
}

impl Application {
    /// Binds, starts the registry and health checker on the current arbiter,
    /// and prepares the workers. Must be called inside an actix `System`.
    pub fn build(settings: &Settings) -> Result<Self, StartupError> {
        let listener = TcpListener::bind(settings.server.listen).map_err(|source| StartupError::Bind {
            address: settings.server.listen,
            source,
        })?;
        let address = listener.local_addr()?;
        let gateway = Arc::new(Gateway::from_settings(settings).map_err(StartupError::Config)?);
        // Keys are parsed once, and only when a route needs them.
        let verifier = if gateway.routes.routes().iter().any(|route| route.auth) {
            Some(Arc::new(
                Verifier::new(&settings.auth).map_err(|err| StartupError::Config(err.to_string()))?,
            ))
        } else {
            None
        };

        let rate_limit = settings.rate_limit.clone();
        let shared_limits = SharedLimits::new(gateway.policies.clone());
        // Fail here, not in a worker, if the backend cannot be set up.
        RateLimiter::new(&rate_limit, &shared_limits).map_err(StartupError::Config)?;
        let passive = Arc::new(PassiveFailures::new(&gateway, settings.health.passive_failures));
        let registry = RegistryActor::new(&gateway, &settings.health, passive.clone()).start();
        HealthChecker::new(&gateway, &settings.health, registry.clone()).start();

        let cursors = shared_cursors(gateway.services.len());
        let instance_counts: Vec<usize> = gateway.services.iter().map(|s| s.instances.len()).collect();
        let upstream = settings.upstream.clone();
        crate::metrics::install();
        actix_rt::spawn(async {
            let mut upkeep = actix_rt::time::interval(METRICS_UPKEEP);
            loop {
                upkeep.tick().await;
                crate::metrics::run_upkeep();
            }
        });

        let mut server = HttpServer::new(move || {
            // Runs once per worker, on the worker's own arbiter: the balancer
            // and the client live beside the requests that use them.
            let balancer = BalancerActor::new(&instance_counts, cursors.clone()).start();
            registry.do_send(SubscribeBalancer(balancer.clone().recipient()));
            let context = WorkerContext {
                gateway: gateway.clone(),
                clients: gateway
                    .services
                    .iter()
                    .map(|service| service.instances.iter().map(|_| upstream_client(&upstream)).collect())
                    .collect(),
                balancer,
                registry: registry.clone(),
                passive: passive.clone(),
            };
            let limiter =
                Rc::new(RateLimiter::new(&rate_limit, &shared_limits).expect("checked before the workers start"));
            App::new()
                .app_data(web::Data::new(context))
                .default_service(web::to(dispatch))
                .wrap(RateLimit::new(Stage::User, gateway.clone(), limiter.clone()))
                .wrap(Authentication::new(verifier.clone()))
                .wrap(RateLimit::new(Stage::Address, gateway.clone(), limiter))
                .wrap(RouteMatcher::new(gateway.clone()))
                .wrap(BodyCheck)
                .wrap(TracingLogger::<GatewayRootSpan>::new())
                .wrap(RequestIds)
                .wrap(SecurityHeaders {
                    some_route_opts_out: gateway.any_route_drops_security_headers,
                })
                .wrap(ConnectionWatch)
        })
        .keep_alive(KEEP_ALIVE)
        .on_connect({
            let watch = watch_connection(KEEP_ALIVE + head_timeout(settings.server.client_request_timeout_ms));
            move |connection, extensions| {
                watch(connection, extensions);
                proxy::remember_peer(connection, extensions);
            }
        })
        .disable_signals()
        .shutdown_timeout(settings.server.shutdown_timeout_s)
        .client_request_timeout(head_timeout(settings.server.client_request_timeout_ms));
        if settings.server.workers > 0 {
            server = server.workers(settings.server.workers);
        }
        let server = server.listen(listener)?.run();
        tracing::info!(%address, "gatehouse listening");
        Ok(Self { server, address })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}

/// actix-http computes the head deadline from a clock it refreshes only every
/// 500 ms, so a deadline of `configured` could land up to 500 ms early (and,
/// under 500 ms, already in the past, which answers complete requests with 408
/// and never times out silent ones). Adding the clock's period makes the
/// effective timeout lie between `configured` and `configured + 500 ms`.
fn head_timeout(configured_ms: u64) -> Duration {
    const ACTIX_CLOCK_PERIOD_MS: u64 = 500;
    Duration::from_millis(configured_ms + ACTIX_CLOCK_PERIOD_MS)
}

fn upstream_client(upstream: &settings::UpstreamSettings) -> awc::Client {
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

/// Serves until SIGTERM or SIGINT, then drains in-flight requests for up to
/// `server.shutdown_timeout_s`.
pub async fn run(settings: Settings) -> Result<(), StartupError> {
    if settings.uses_dev_secret() {
        tracing::warn!("auth.jwt_secret is the shipped development secret: never use it in production");
    }
    let application = Application::build(&settings)?;
    let handle = application.handle();
    actix_rt::spawn(async move {
        wait_for_shutdown_signal().await;
        tracing::info!("shutdown signal received; draining in-flight requests");
        handle.stop(true).await;
    });
    application.run_until_stopped().await?;
    tracing::info!("gatehouse stopped");
    Ok(())
}

async fn wait_for_shutdown_signal() {
    #[cfg(unix)]
    {
        use actix_rt::signal::unix::{signal, SignalKind};
        let mut terminate = match signal(SignalKind::terminate()) {
            Ok(stream) => stream,
            Err(err) => {
                tracing::error!(%err, "cannot listen for SIGTERM");
                let _ = actix_rt::signal::ctrl_c().await;
                return;
            }
        };
        let terminated = std::pin::pin!(terminate.recv());
        let interrupted = std::pin::pin!(actix_rt::signal::ctrl_c());
        futures_util::future::select(terminated, interrupted).await;
    }
    #[cfg(not(unix))]
    {
        let _ = actix_rt::signal::ctrl_c().await;
    }
}
