//! Wiring: bind the listener, start the actors, hand each worker what it
//! builds its App from ([`crate::worker`]), set the server's options.
//!
//! [`Application::build`] binds first and keeps the real address, so tests can
//! listen on port 0; [`Application::run_until_stopped`] serves until the server
//! is stopped, and [`run`] adds the SIGTERM/SIGINT graceful drain.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::HttpServer;

use crate::actors::registry::RegistryActor;
use crate::gateway::compile;
use crate::middleware::connection_watch::watch_connection;
use crate::proxy;
use crate::ratelimit::SharedLimits;
use crate::reload::{Cause, Reload, ReloadHandle, Reloader};
use crate::settings::{Settings, Sources};
use crate::tls::CertificateResolver;
use crate::websocket::TunnelCloser;
use crate::worker::Workers;

/// Idle keep-alive connections from clients are closed after this long.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

pub struct Application {
    server: Server,
    address: Option<SocketAddr>,
    tls_address: Option<SocketAddr>,
    reloader: ReloadHandle,
    tunnel_closer: TunnelCloser,
    /// `server.shutdown_timeout_s`.
    drain: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("{key}: cannot listen on {address}: {source}")]
    Bind {
        key: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("cannot start the HTTP server: {0}")]
    Server(#[from] std::io::Error),
}

impl Application {
    /// Binds, compiles the configuration, starts the registry, the health
    /// checker and the reloader on the current arbiter, and starts the
    /// workers. `settings` were loaded from `sources`, which reloads read
    /// again. Must be called inside an actix `System`.
    pub fn build(settings: &Settings, sources: Sources) -> Result<Self, StartupError> {
        let listener = bind("server.listen", settings.server.listen)?;
        let tls_listener = bind("server.tls.listen", settings.server.tls.listen)?;
        let address = listener.as_ref().map(TcpListener::local_addr).transpose()?;
        let tls_address = tls_listener.as_ref().map(TcpListener::local_addr).transpose()?;
        let runtime = compile(settings).map_err(|problems| StartupError::Config(problems.join("\n")))?;
        let certificates = runtime
            .certificate
            .clone()
            .map(|key| Arc::new(CertificateResolver::new(key)));
        crate::metrics::install();
        crate::metrics::spawn_upkeep();
        crate::jwks::fetch_for(runtime.verifier.as_ref(), &runtime.gateway);
        let (registry, deployment) = RegistryActor::start(
            runtime,
            settings.health.clone(),
            settings.upstream.clone(),
            settings.rate_limit.clone(),
        );
        crate::metrics::config_generation(deployment.generation);
        let shared_limits = SharedLimits::default();
        let reloader = Reloader::start(
            sources,
            settings.clone(),
            deployment.verifier.clone(),
            certificates.clone(),
            registry.clone(),
            shared_limits.clone(),
        );
        let (tunnel_closer, tunnel_shutdown) = TunnelCloser::new();
        let workers = Arc::new(Workers {
            deployment,
            shared_limits,
            registry,
            tunnel_shutdown,
        });
        let mut server = with_server_options(HttpServer::new(move || workers.app()), settings);
        if let Some(listener) = listener {
            server = server.listen(listener)?;
        }
        if let (Some(listener), Some(certificates)) = (tls_listener, certificates) {
            server = server.listen_rustls_0_23(listener, crate::tls::server_config(certificates))?;
        }
        let server = server.run();
        tracing::info!(address = ?address, tls_address = ?tls_address, "gatehouse listening");
        Ok(Self {
            server,
            address,
            tls_address,
            reloader,
            tunnel_closer,
            drain: Duration::from_secs(settings.server.shutdown_timeout_s),
        })
    }

    /// The plain listener's address, `None` for a TLS-only gateway.
    pub fn address(&self) -> Option<SocketAddr> {
        self.address
    }

    /// The TLS listener's address, if there is one.
    pub fn tls_address(&self) -> Option<SocketAddr> {
        self.tls_address
    }

    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Stops the server: no new connections, requests in flight finish,
    /// for `server.shutdown_timeout_s` at most; WebSocket tunnels are
    /// closed with 1001 just before that time is up.
    pub fn graceful_stop(&self) -> impl std::future::Future<Output = ()> + 'static {
        let (handle, closer, drain) = (self.handle(), self.tunnel_closer.clone(), self.drain);
        async move {
            actix_rt::spawn(closer.close_before_drain_ends(drain));
            handle.stop(true).await;
        }
    }

    /// Reloads the configuration as SIGHUP does.
    pub fn reloader(&self) -> ReloadHandle {
        self.reloader.clone()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}

/// Binds `address` (the setting `key`), if set.
fn bind(key: &'static str, address: Option<SocketAddr>) -> Result<Option<TcpListener>, StartupError> {
    address
        .map(|address| TcpListener::bind(address).map_err(|source| StartupError::Bind { key, address, source }))
        .transpose()
}

/// Timeouts, the drain, the connection hooks and the worker count.
fn with_server_options<F, I, S, B>(server: HttpServer<F, I, S, B>, settings: &Settings) -> HttpServer<F, I, S, B>
where
    F: Fn() -> I + Send + Clone + 'static,
    I: actix_service::IntoServiceFactory<S, actix_http::Request>,
    S: actix_web::dev::ServiceFactory<actix_http::Request, Config = actix_web::dev::AppConfig> + 'static,
    S::Error: Into<actix_web::Error> + 'static,
    S::InitError: std::fmt::Debug,
    S::Response: Into<actix_http::Response<B>> + 'static,
    B: actix_web::body::MessageBody + 'static,
{
    let head_timeout = head_timeout(settings.server.client_request_timeout_ms);
    let server = server
        .keep_alive(KEEP_ALIVE)
        .on_connect({
            let watch = watch_connection(KEEP_ALIVE + head_timeout);
            move |connection, extensions| {
                watch(connection, extensions);
                proxy::remember_peer(connection, extensions);
            }
        })
        .disable_signals()
        .shutdown_timeout(settings.server.shutdown_timeout_s)
        .client_request_timeout(head_timeout);
    match settings.server.workers {
        0 => server,
        workers => server.workers(workers),
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

/// Serves until SIGTERM or SIGINT, then drains in-flight requests for up to
/// `server.shutdown_timeout_s`; reloads on SIGHUP.
pub async fn run(settings: Settings, sources: Sources) -> Result<(), StartupError> {
    if settings.uses_dev_secret() {
        tracing::warn!("auth.jwt_secret is the shipped development secret: never use it in production");
    }
    for (name, max) in settings.large_sliding_logs() {
        tracing::warn!(
            policy = %name,
            max,
            "rate_limit.policies.{name}: a sliding_log keeps every admission per client (~60-160 bytes each); \
             with max above {} consider algorithm = \"sliding_window\" (constant memory)",
            crate::settings::LARGE_LOG_MAX
        );
    }
    // Before listening: a SIGHUP's default action is to end the process.
    let hangups = hangup_signals();
    let application = Application::build(&settings, sources)?;
    reload_on_hangup(hangups, application.reloader());
    let stop = application.graceful_stop();
    actix_rt::spawn(async move {
        wait_for_shutdown_signal().await;
        tracing::info!("shutdown signal received; draining in-flight requests");
        stop.await;
    });
    application.run_until_stopped().await?;
    tracing::info!("gatehouse stopped");
    Ok(())
}

#[cfg(unix)]
type HangupSignals = Option<actix_rt::signal::unix::Signal>;
#[cfg(not(unix))]
type HangupSignals = ();

/// Takes over SIGHUP from now on.
fn hangup_signals() -> HangupSignals {
    #[cfg(unix)]
    {
        use actix_rt::signal::unix::{signal, SignalKind};
        signal(SignalKind::hangup())
            .map_err(|err| tracing::error!(%err, "cannot listen for SIGHUP; reloads need server.watch_config"))
            .ok()
    }
}

/// Every SIGHUP reloads the configuration (the reloader logs the outcome).
fn reload_on_hangup(hangups: HangupSignals, reloader: ReloadHandle) {
    #[cfg(unix)]
    if let Some(mut hangups) = hangups {
        actix_rt::spawn(async move {
            while hangups.recv().await.is_some() {
                tracing::info!("SIGHUP received; reloading the configuration");
                let _ = reloader.send(Reload(Cause::Signal)).await;
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (hangups, reloader);
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
