//! Live reconfiguration (SPEC §7): SIGHUP, and with `server.watch_config` a
//! change to a settings file, read every layer again, validate and compile
//! it exactly as start-up does, and hand the result to the registry, which
//! puts it in force in every worker.
//!
//! The [`Reloader`] takes one reload at a time. An invalid configuration
//! changes nothing: the running one keeps serving and the error is logged
//! and shown in `/health`. Keys that only a restart can apply keep their
//! running values, with a warning naming each.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, ActorFutureExt, Addr, AsyncContext, AtomicResponse, Context, Handler, Message, WrapFuture};

use crate::actors::registry::{Reconfigure, RegistryActor, ReloadFailed};
use crate::auth::Verifier;
use crate::gateway::compile;
use crate::ratelimit::SharedLimits;
use crate::settings::{Settings, Sources};
use crate::tls::CertificateResolver;

/// Writes closer together than this are one reload (SPEC §7).
const DEBOUNCE: Duration = Duration::from_millis(200);

/// What asked for a reload; logged with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Signal,
    FileChange,
    /// An embedding program or a test ([`ReloadHandle::reload`]).
    Request,
}

/// Reads, validates and applies the configuration again. Answers the new
/// generation once every worker serves it, or the error that kept the
/// running configuration in force.
#[derive(Debug, Message)]
#[rtype(result = "Result<u64, String>")]
pub struct Reload(pub Cause);

/// Asks the running gateway to reload; cheap to clone and `Send`.
#[derive(Clone)]
pub struct ReloadHandle(Addr<Reloader>);

impl ReloadHandle {
    pub async fn reload(&self) -> Result<u64, String> {
        self.send(Reload(Cause::Request)).await
    }

    pub(crate) async fn send(&self, reload: Reload) -> Result<u64, String> {
        self.0
            .send(reload)
            .await
            .unwrap_or_else(|_| Err("the gateway has stopped".to_owned()))
    }
}

pub struct Reloader {
    sources: Sources,
    /// The configuration in force.
    running: Settings,
    /// Its verifier, and the key file it was read from, reused while both
    /// are unchanged so each worker's token cache survives the reload.
    verifier: Option<(Arc<Verifier>, Option<Vec<u8>>)>,
    registry: Addr<RegistryActor>,
    shared_limits: SharedLimits,
    /// The TLS listener's certificate, replaced by every successful reload.
    certificates: Option<Arc<CertificateResolver>>,
    /// Present while `server.watch_config` is on, with the files it
    /// watches.
    watcher: Option<(notify::RecommendedWatcher, Vec<PathBuf>)>,
    /// The settings files' contents as last read, so a change that leaves
    /// them as they were (a rewrite with the same bytes, a file beside them
    /// in the folder) is no reload.
    files_seen: u64,
}

impl Reloader {
    /// Starts on the current arbiter, watching the files if the running
    /// configuration asks for it.
    pub fn start(
        sources: Sources,
        running: Settings,
        verifier: Option<Arc<Verifier>>,
        certificates: Option<Arc<CertificateResolver>>,
        registry: Addr<RegistryActor>,
        shared_limits: SharedLimits,
    ) -> ReloadHandle {
        let key_file = key_file_contents(&running);
        let reloader = Self {
            files_seen: fingerprint(&watched_files(&sources, &running)),
            certificates,
            sources,
            verifier: verifier.map(|verifier| (verifier, key_file)),
            running,
            registry,
            shared_limits,
            watcher: None,
        };
        // Watching starts before the gateway serves, so no change is missed.
        ReloadHandle(Self::create(|ctx| {
            let mut reloader = reloader;
            reloader.watch(ctx);
            reloader
        }))
    }

    /// Reads and compiles the configuration; on success, what to send to the
    /// registry and the settings it came from.
    fn prepare(&mut self) -> Result<(Reconfigure, Settings), String> {
        let mut settings = Settings::load(&self.sources).map_err(|err| err.to_string())?;
        keep_restart_only_keys(&mut settings, &self.running);
        let mut runtime =
            compile(&settings).map_err(|problems| format!("invalid configuration:\n  {}", problems.join("\n  ")))?;
        let key_file = key_file_contents(&settings);
        if let (Some((running, running_key_file)), Some(_)) = (&self.verifier, &runtime.verifier) {
            if settings.auth == self.running.auth && key_file == *running_key_file {
                runtime.verifier = Some(running.clone());
            }
        }
        // New keys for the same provider start from the set in force.
        if let (Some(next), Some((running, _))) = (
            runtime.verifier.as_ref().and_then(|verifier| verifier.jwks()),
            &self.verifier,
        ) {
            if let Some(previous) = running.jwks().filter(|previous| !Arc::ptr_eq(previous, next)) {
                next.inherit(previous);
            }
        }
        self.verifier = runtime.verifier.clone().map(|verifier| (verifier, key_file));
        // A kept verifier's fetcher runs on; a new one's starts.
        crate::jwks::fetch_for(runtime.verifier.as_ref(), &runtime.gateway);
        let reconfigure = Reconfigure {
            runtime,
            health: settings.health.clone(),
            upstream: settings.upstream.clone(),
            rate_limit: settings.rate_limit.clone(),
        };
        Ok((reconfigure, settings))
    }

    /// Starts or stops watching the files to match `server.watch_config`,
    /// and follows the files the configuration names.
    fn watch(&mut self, ctx: &mut Context<Self>) {
        if !self.running.server.watch_config {
            self.watcher = None;
            return;
        }
        let files = watched_files(&self.sources, &self.running);
        if self.watcher.as_ref().is_some_and(|(_, watched)| *watched == files) {
            return;
        }
        self.watcher = None;
        match watch_files(files.clone(), ctx.address()) {
            Ok(watcher) => self.watcher = Some((watcher, files)),
            Err(err) => tracing::error!(%err, "cannot watch the settings files; SIGHUP still reloads"),
        }
    }
}

impl Actor for Reloader {
    type Context = Context<Self>;
}

impl Handler<Reload> for Reloader {
    /// Atomic: one reload at a time, each against the previous one's result.
    type Result = AtomicResponse<Self, Result<u64, String>>;

    fn handle(&mut self, Reload(cause): Reload, _: &mut Context<Self>) -> Self::Result {
        let started = Instant::now();
        let files = fingerprint(&watched_files(&self.sources, &self.running));
        if cause == Cause::FileChange && files == self.files_seen {
            return AtomicResponse::new(Box::pin(actix::fut::ready(Err("no settings file changed".to_owned()))));
        }
        self.files_seen = files;
        let (reconfigure, settings) = match self.prepare() {
            Ok(prepared) => prepared,
            Err(error) => {
                tracing::error!(?cause, %error, "configuration reload failed; the running configuration stays");
                crate::metrics::config_reload("failure");
                self.registry.do_send(ReloadFailed(error.clone()));
                return AtomicResponse::new(Box::pin(actix::fut::ready(Err(error))));
            }
        };
        let kept_policies: Vec<String> = settings.rate_limit.policies.keys().cloned().collect();
        let certificate = reconfigure.runtime.certificate.clone();
        let swap = self.registry.send(reconfigure);
        AtomicResponse::new(Box::pin(swap.into_actor(self).map(move |generation, reloader, ctx| {
            let generation = generation.map_err(|_| "the registry has stopped".to_owned())?;
            let kept: Vec<&str> = kept_policies.iter().map(String::as_str).collect();
            reloader.shared_limits.local.retain_policies(&kept);
            if let (Some(resolver), Some(certificate)) = (&reloader.certificates, certificate) {
                resolver.replace(certificate);
            }
            reloader.running = settings;
            reloader.watch(ctx);
            crate::metrics::config_reload("success");
            tracing::info!(
                ?cause,
                generation,
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                "configuration reloaded"
            );
            Ok(generation)
        })))
    }
}

/// The keys SPEC §7 applies only at start-up: each that changed is put back
/// to its running value, with a warning.
fn keep_restart_only_keys(next: &mut Settings, running: &Settings) {
    fn keep<T: PartialEq + Clone>(key: &str, next: &mut T, running: &T) {
        if next != running {
            tracing::warn!(
                key,
                "changed in the settings files but applied only at start-up: keeping the running value until a restart"
            );
            *next = running.clone();
        }
    }
    keep("server.listen", &mut next.server.listen, &running.server.listen);
    keep(
        "server.tls.listen",
        &mut next.server.tls.listen,
        &running.server.tls.listen,
    );
    keep("server.workers", &mut next.server.workers, &running.server.workers);
    keep(
        "server.client_request_timeout_ms",
        &mut next.server.client_request_timeout_ms,
        &running.server.client_request_timeout_ms,
    );
    keep(
        "server.shutdown_timeout_s",
        &mut next.server.shutdown_timeout_s,
        &running.server.shutdown_timeout_s,
    );
    keep(
        "rate_limit.backend",
        &mut next.rate_limit.backend,
        &running.rate_limit.backend,
    );
    keep(
        "rate_limit.redis_url",
        &mut next.rate_limit.redis_url,
        &running.rate_limit.redis_url,
    );
    keep(
        "rate_limit.redis_cluster",
        &mut next.rate_limit.redis_cluster,
        &running.rate_limit.redis_cluster,
    );
}

fn key_file_contents(settings: &Settings) -> Option<Vec<u8>> {
    let path = &settings.auth.public_key_pem;
    (!path.is_empty()).then(|| std::fs::read(path).ok()).flatten()
}

/// The files a reload reads: the settings layers, and the files the
/// running configuration names (TLS certificate and key, upstream CA, token
/// key), which cert-manager, certbot and the like rewrite in place.
fn watched_files(sources: &Sources, running: &Settings) -> Vec<PathBuf> {
    let mut files = sources.layer_files();
    let tls = &running.server.tls;
    let named = [
        (tls.listen.is_some(), &tls.cert_file),
        (tls.listen.is_some(), &tls.key_file),
        (true, &running.upstream.ca_file),
        (true, &running.auth.public_key_pem),
    ];
    files.extend(
        named
            .into_iter()
            .filter(|(used, path)| *used && !path.is_empty())
            .map(|(_, path)| PathBuf::from(path)),
    );
    files
}

/// A digest of the files' contents (absent files included).
fn fingerprint(files: &[PathBuf]) -> u64 {
    let mut hasher = DefaultHasher::new();
    for file in files {
        std::fs::read(file).ok().hash(&mut hasher);
    }
    hasher.finish()
}

/// Watches the folders that hold `files`. An editor's
/// write-then-rename and a Kubernetes ConfigMap's swap of its `..data`
/// symlink show up as events on the folder's entries, so the folders are
/// watched, not the files; events on other entries, and reads (the reloader
/// itself reads the files), are ignored. A burst of changes is one reload,
/// sent once the files have been quiet for [`DEBOUNCE`].
fn watch_files(files: Vec<PathBuf>, reloader: Addr<Reloader>) -> notify::Result<notify::RecommendedWatcher> {
    use notify::{EventKind, Watcher};

    let names: Vec<std::ffi::OsString> = files
        .iter()
        .filter_map(|file| file.file_name().map(ToOwned::to_owned))
        .chain([std::ffi::OsString::from("..data")])
        .collect();
    let mut folders: Vec<PathBuf> = files
        .iter()
        .map(|file| match file.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        })
        .collect();
    folders.sort();
    folders.dedup();

    let (changes, changed) = std::sync::mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
        Ok(event) => {
            let is_layer = |path: &PathBuf| {
                path.file_name()
                    .is_some_and(|name| names.iter().any(|known| known == name))
            };
            if !matches!(event.kind, EventKind::Access(_)) && event.paths.iter().any(is_layer) {
                let _ = changes.send(());
            }
        }
        Err(err) => tracing::warn!(%err, "settings watcher error"),
    })?;
    for folder in &folders {
        watcher.watch(folder, notify::RecursiveMode::NonRecursive)?;
    }
    // Ends when the watcher, and with it the sender, is dropped.
    std::thread::Builder::new()
        .name("gatehouse-watch".to_owned())
        .spawn(move || {
            while changed.recv().is_ok() {
                loop {
                    match changed.recv_timeout(DEBOUNCE) {
                        Ok(()) => continue,
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                reloader.do_send(Reload(Cause::FileChange));
            }
        })
        .map_err(notify::Error::io)?;
    tracing::info!(folders = ?folders, "watching the settings files");
    Ok(watcher)
}
