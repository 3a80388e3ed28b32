//! Real parts for the integration tests: upstream HTTP servers on port 0, the
//! gateway in process (its own actix System on its own thread) or as the
//! real binary, an HTTP client that neither follows redirects nor
//! decompresses, a raw TCP client for malformed requests, instances on raw
//! sockets that close or never answer, a real `redis-server`, and the binary
//! run to its end with a clean environment. Every server here stops when its
//! handle is dropped, so a test that fails halfway leaves no port open.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use futures_util::StreamExt;
use gatehouse::reload::ReloadHandle;
use gatehouse::settings::{ConfigError, Settings, Sources};
use gatehouse::startup::Application;
use sha2::{Digest, Sha256};

/// What an upstream saw of one request.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    /// Path and query exactly as received.
    pub target: String,
    pub headers: BTreeMap<String, Vec<String>>,
    pub body_len: usize,
    pub body_sha256: String,
    /// The gateway's end of the connection the request came on: the same
    /// for requests that reused a pooled connection.
    pub peer: Option<SocketAddr>,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|values| values.first())
            .map(String::as_str)
    }
}

#[derive(Default)]
struct UpstreamState {
    hits: AtomicUsize,
    health_status: AtomicU16,
    seen: Mutex<Vec<SeenRequest>>,
    /// Close codes its WebSocket sessions received, in order.
    ws_closes: Mutex<Vec<u16>>,
}

/// A real upstream service on a loopback port.
///
/// - `/health` answers with the status set by [`Upstream::set_health`] (200 at start).
/// - `…/download/<n>` streams `n` bytes of a fixed pattern with a `Content-Length`.
/// - `…/chunked/<n>` streams `n` bytes without a length (chunked).
/// - `…/gzip` answers a gzip body with `Content-Encoding: gzip`.
/// - `…/redirect` answers 302 to `/elsewhere`.
/// - `…/bare` answers a body without `Content-Type`.
/// - `…/own-headers` sets its own `Content-Security-Policy` and `X-Frame-Options`.
/// - `…/slow/<ms>` waits before answering.
/// - `…/ws` with `Upgrade: websocket` is a WebSocket echo (see [`ws_echo`]);
///   `…/ws-refused` answers such an upgrade with 403, `…/ws-ignored` with a
///   plain 200.
/// - anything else echoes JSON: instance, method, target, headers, body size and hash.
///
/// Every response carries `Server: upstream-server` and `X-Powered-By: Express`.
///
/// Dropping it stops the server and closes its port.
pub struct Upstream {
    pub name: String,
    pub address: SocketAddr,
    state: Arc<UpstreamState>,
    server: ServerThread,
}

impl Upstream {
    pub fn start(name: &str) -> Self {
        Self::start_on(name, TcpListener::bind("127.0.0.1:0").unwrap())
    }

    /// Starts on a given listener (to come back on the same port).
    pub fn start_on(name: &str, listener: TcpListener) -> Self {
        let state = Arc::new(UpstreamState::default());
        state.health_status.store(200, Ordering::SeqCst);
        let address = listener.local_addr().unwrap();
        let name_for_server = name.to_owned();
        let state_for_server = state.clone();
        let (server, ()) = ServerThread::spawn(move || {
            let server = HttpServer::new(move || {
                App::new()
                    .app_data(web::Data::new((name_for_server.clone(), state_for_server.clone())))
                    .default_service(web::to(upstream_handler))
            })
            .workers(2)
            .disable_signals()
            .shutdown_timeout(0)
            .listen(listener)
            .unwrap()
            .run();
            ((), server.handle(), server)
        });
        Self {
            name: name.to_owned(),
            address,
            state,
            server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Requests other than health probes served so far.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn last_seen(&self) -> SeenRequest {
        self.seen().pop().expect("the upstream saw no request")
    }

    /// The close codes its WebSocket sessions received from the gateway.
    pub fn ws_closes(&self) -> Vec<u16> {
        self.state.ws_closes.lock().unwrap().clone()
    }

    pub fn set_health(&self, status: u16) {
        self.state.health_status.store(status, Ordering::SeqCst);
    }

    /// Stops the server now, without waiting for open connections; its port
    /// then refuses connections.
    pub async fn stop(&self) {
        self.server.stop(false).await;
    }
}

// ---------------------------------------------------------------------------
// Servers on threads of their own
// ---------------------------------------------------------------------------

/// How long a dropped test server may take to stop before the test goes on
/// without it (and says so on stderr).
const STOP_LIMIT: Duration = Duration::from_secs(5);

/// An actix server on a thread of its own, in its own `System`, so a test's
/// runtime never serves it. Dropping it stops the server without waiting for
/// open connections and waits, [`STOP_LIMIT`] at most, for the thread to end:
/// by then the acceptor has released the listener and the port is closed.
struct ServerThread {
    handle: ServerHandle,
    system: actix_web::rt::System,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    /// Runs `start` inside the new `System`: it binds and returns what the
    /// test needs, the server's handle, and the future that serves until the
    /// server stops. A panic in `start` is the caller's panic.
    fn spawn<T, F>(start: impl FnOnce() -> (T, ServerHandle, F) + Send + 'static) -> (Self, T)
    where
        T: Send + 'static,
        F: Future + 'static,
    {
        let (sender, receiver) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let (value, handle, serving) = start();
                let _ = sender.send((value, handle, actix_web::rt::System::current()));
                serving.await;
            });
        });
        match receiver.recv() {
            Ok((value, handle, system)) => (
                Self {
                    handle,
                    system,
                    thread: Some(thread),
                },
                value,
            ),
            Err(_) => match thread.join() {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(()) => panic!("the server thread ended before it started serving"),
            },
        }
    }

    /// Stops the server (`graceful`: after open requests finish, within the
    /// server's shutdown timeout) and waits until it has.
    async fn stop(&self, graceful: bool) {
        self.handle.stop(graceful).await;
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        // The stop is awaited on the server's own System, which drives it
        // whatever runtime (or none) the dropping test runs on. Harmless when
        // the server has stopped already: the arbiter or the server is gone.
        let handle = self.handle.clone();
        self.system.arbiter().spawn(async move { handle.stop(false).await });
        if let Some(thread) = self.thread.take() {
            join_within(thread, STOP_LIMIT, "a test server");
        }
    }
}

/// Joins `thread` if it ends within `limit`; otherwise leaves it and says so,
/// so a stuck server never hangs the test that dropped it.
fn join_within(thread: std::thread::JoinHandle<()>, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    while !thread.is_finished() {
        if Instant::now() >= deadline {
            eprintln!("{what} did not stop within {limit:?}; leaving its thread behind");
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = thread.join();
}

type UpstreamData = web::Data<(String, Arc<UpstreamState>)>;

/// The byte at `index` of every download body.
pub fn pattern_byte(index: usize) -> u8 {
    (index % 251) as u8
}

pub fn pattern_sha256(len: usize) -> String {
    let mut hasher = Sha256::new();
    let mut start = 0;
    while start < len {
        let end = (start + (1 << 16)).min(len);
        hasher.update((start..end).map(pattern_byte).collect::<Vec<u8>>());
        start = end;
    }
    hex(&hasher.finalize())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// `len` bytes of the test pattern, 64 KiB at a time, never held whole.
pub fn pattern_stream<E>(len: usize) -> impl futures_util::Stream<Item = Result<web::Bytes, E>> {
    const CHUNK: usize = 64 * 1024;
    futures_util::stream::iter((0..len).step_by(CHUNK).map(move |start| {
        let end = (start + CHUNK).min(len);
        Ok(web::Bytes::from((start..end).map(pattern_byte).collect::<Vec<u8>>()))
    }))
}

async fn upstream_handler(req: HttpRequest, mut payload: web::Payload, data: UpstreamData) -> HttpResponse {
    let (name, state) = (&data.0, &data.1);
    let path = req.path().to_owned();
    if path == "/health" {
        let status = StatusCode::from_u16(state.health_status.load(Ordering::SeqCst)).unwrap();
        return HttpResponse::build(status).json(serde_json::json!({ "status": status.as_u16() }));
    }
    let ws_paths = ["/ws", "/ws-refused", "/ws-ignored"];
    if req.headers().contains_key("upgrade") && ws_paths.iter().any(|end| path.ends_with(end)) {
        record(&req, state, 0, String::new());
        if path.ends_with("/ws-refused") {
            return HttpResponse::Forbidden()
                .insert_header(("x-upstream-instance", name.as_str()))
                .insert_header(("server", "upstream-server"))
                .body("no tunnels here");
        }
        if path.ends_with("/ws-ignored") {
            return HttpResponse::Ok()
                .insert_header(("x-upstream-instance", name.as_str()))
                .body("a plain answer");
        }
        return ws_echo(&req, payload, state.clone());
    }
    let mut hasher = Sha256::new();
    let mut body_len = 0;
    while let Some(chunk) = payload.next().await {
        let Ok(chunk) = chunk else { break };
        body_len += chunk.len();
        hasher.update(&chunk);
    }
    let seen = record(&req, state, body_len, hex(&hasher.finalize()));

    let mut response = HttpResponse::Ok();
    response
        .insert_header(("server", "upstream-server"))
        .insert_header(("x-powered-by", "Express"))
        .insert_header(("x-upstream-instance", name.as_str()));
    let last = path.rsplit('/').next().unwrap_or("");
    let parent = path.rsplit('/').nth(1).unwrap_or("");
    match (parent, last) {
        ("download", n) => {
            let len: usize = n.parse().unwrap_or(0);
            response
                .no_chunking(len as u64)
                .streaming(pattern_stream::<actix_web::Error>(len))
        }
        ("chunked", n) => {
            let len: usize = n.parse().unwrap_or(0);
            response.insert_header(("content-type", "application/octet-stream"));
            response.streaming(pattern_stream::<actix_web::Error>(len))
        }
        (_, "gzip") => {
            use flate2::write::GzEncoder;
            let mut encoder = GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(b"{\"compressed\":true}").unwrap();
            response
                .insert_header(("content-encoding", "gzip"))
                .insert_header(("content-type", "application/json"))
                .body(encoder.finish().unwrap())
        }
        (_, "redirect") => HttpResponse::Found()
            .insert_header(("location", "/elsewhere"))
            .insert_header(("x-upstream-instance", name.as_str()))
            .finish(),
        (_, "bare") => {
            let mut bare = response.body("plain bytes");
            bare.headers_mut().remove("content-type");
            bare
        }
        (_, "own-headers") => response
            .insert_header(("content-security-policy", "default-src 'none'"))
            .insert_header(("x-frame-options", "DENY"))
            .json(serde_json::json!({ "own": true })),
        ("slow", ms) => {
            actix_web::rt::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            response.json(echo_json(name, &seen))
        }
        _ => response.json(echo_json(name, &seen)),
    }
}

/// Counts a request and keeps what the upstream saw of it.
fn record(req: &HttpRequest, state: &UpstreamState, body_len: usize, body_sha256: String) -> SeenRequest {
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (header_name, value) in req.headers().iter() {
        headers
            .entry(header_name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let seen = SeenRequest {
        method: req.method().to_string(),
        target: req
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str().to_owned())
            .unwrap_or_default(),
        headers,
        body_len,
        body_sha256,
        peer: req.peer_addr(),
    };
    state.hits.fetch_add(1, Ordering::SeqCst);
    state.seen.lock().unwrap().push(seen.clone());
    seen
}

/// A WebSocket echo: text, binary and continuation frames come back as
/// sent; a ping comes back as the text `ping:<payload>` and a pong as
/// `pong:<payload>` (so a test sees they reached the instance, and that
/// nobody on the way answered them); a close is answered with the same
/// code and reason. The text `close:<code>:<reason>` makes it close first,
/// and `send:<n>` makes it send a binary message of `n` bytes. Of the
/// protocols offered it picks the last.
fn ws_echo(req: &HttpRequest, payload: web::Payload, state: Arc<UpstreamState>) -> HttpResponse {
    use actix_ws::Message;
    let offered: Vec<String> = req
        .headers()
        .get_all("sec-websocket-protocol")
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|protocol| protocol.trim().to_owned())
        .collect();
    let (mut response, mut session, messages) = actix_ws::handle(req, payload).expect("a valid handshake");
    if let Some(chosen) = offered.last() {
        response
            .headers_mut()
            .insert(awc::http::header::SEC_WEBSOCKET_PROTOCOL, chosen.parse().unwrap());
    }
    let mut messages = messages.max_frame_size(64 * 1024 * 1024);
    actix_web::rt::spawn(async move {
        while let Some(Ok(message)) = messages.next().await {
            let sent = match message {
                Message::Text(text) => {
                    if let Some(rest) = text.strip_prefix("close:") {
                        let (code, reason) = rest.split_once(':').unwrap_or((rest, ""));
                        let reason = actix_ws::CloseReason {
                            code: actix_ws::CloseCode::from(code.parse::<u16>().unwrap_or(1000)),
                            description: Some(reason.to_owned()),
                        };
                        let _ = session.clone().close(Some(reason)).await;
                        continue;
                    }
                    if let Some(n) = text.strip_prefix("send:") {
                        session.binary(vec![b'x'; n.parse().unwrap_or(0)]).await
                    } else {
                        session.text(text).await
                    }
                }
                Message::Binary(bytes) => session.binary(bytes).await,
                Message::Continuation(item) => session.continuation(item).await,
                Message::Ping(bytes) => session.text(format!("ping:{}", String::from_utf8_lossy(&bytes))).await,
                Message::Pong(bytes) => session.text(format!("pong:{}", String::from_utf8_lossy(&bytes))).await,
                Message::Close(reason) => {
                    state
                        .ws_closes
                        .lock()
                        .unwrap()
                        .push(reason.as_ref().map_or(1005, |reason| u16::from(reason.code)));
                    let _ = session.close(reason).await;
                    return;
                }
                Message::Nop => Ok(()),
            };
            if sent.is_err() {
                return;
            }
        }
    });
    response
}

fn echo_json(name: &str, seen: &SeenRequest) -> serde_json::Value {
    serde_json::json!({
        "instance": name,
        "method": seen.method,
        "target": seen.target,
        "headers": seen.headers,
        "body_len": seen.body_len,
        "body_sha256": seen.body_sha256,
    })
}

/// An HS256 token signed with `secret` for `sub`, valid for an hour.
pub fn hs256_token(secret: &str, sub: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({ "sub": sub, "iat": now, "exp": now + 3600 }),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// `["http://127.0.0.1:1", …]` for a service's `instances`.
pub fn instances(upstreams: &[&Upstream]) -> String {
    let urls: Vec<String> = upstreams.iter().map(|u| format!("{:?}", u.url())).collect();
    format!("[{}]", urls.join(", "))
}

/// A free loopback port nobody listens on (bound, then released).
pub fn closed_port_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

/// Writes `toml` as the only layer (`default.toml`) of a fresh settings directory.
pub fn settings_dir(toml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("default.toml"), toml).unwrap();
    dir
}

/// The layers of a test gateway: `dir` and `GATEHOUSE_ENV=test`, no
/// environment variables.
pub fn sources_of(dir: &Path) -> Sources {
    Sources {
        settings_dir: dir.to_owned(),
        environment: "test".to_owned(),
        config_file: None,
        vars: Default::default(),
    }
}

/// The problems `serve` and `check-config` refuse `toml` with: validation's,
/// or, for valid settings, the compile step's (which reads the key and
/// certificate files); panics when it would start.
pub fn problems(toml: &str) -> Vec<String> {
    let dir = settings_dir(toml);
    match Settings::load(&sources_of(dir.path())) {
        Err(ConfigError::Invalid(problems)) => problems,
        Err(other) => panic!("expected validation problems, got {other}"),
        Ok(settings) => match gatehouse::gateway::compile(&settings) {
            Err(problems) => problems,
            Ok(_) => panic!("expected the configuration to be refused:\n{toml}"),
        },
    }
}

pub fn load_settings(dir: &Path) -> Settings {
    Settings::load(&sources_of(dir)).unwrap_or_else(|err| panic!("test settings are invalid: {err}"))
}

/// The real gateway, in this process, on its own thread and actix System.
/// Dropping it stops the gateway and closes its port.
pub struct TestGateway {
    pub address: SocketAddr,
    /// The TLS listener, when `server.tls.listen` is set.
    pub tls_address: Option<SocketAddr>,
    server: ServerThread,
    reloader: ReloadHandle,
    settings_dir: tempfile::TempDir,
    /// The `[server]` table as written at start.
    server_table: String,
}

impl TestGateway {
    /// Starts with the builder's defaults; `toml` is everything after the
    /// `[server]` table that [`GatewayBuilder`] writes.
    pub fn start(toml: &str) -> Self {
        Self::builder().start(toml)
    }

    /// Two workers on `127.0.0.1:0`, unless told otherwise.
    pub fn builder() -> GatewayBuilder<Self> {
        GatewayBuilder::new(2)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// `https://localhost:<TLS port><path>`.
    pub fn tls_url(&self, path: &str) -> String {
        let address = self.tls_address.expect("the gateway has a TLS listener");
        format!("https://localhost:{}{path}", address.port())
    }

    /// Stops gracefully: open requests finish first, within
    /// `server.shutdown_timeout_s`.
    pub async fn stop(&self) {
        self.server.stop(true).await;
    }

    /// Reads the settings directory again, as SIGHUP does: the new
    /// generation once every worker serves it, or the error that kept the
    /// running configuration.
    pub async fn reload(&self) -> Result<u64, String> {
        self.reloader.reload().await
    }

    /// The gateway's only settings layer.
    pub fn settings_file(&self) -> PathBuf {
        self.settings_dir.path().join("default.toml")
    }

    /// The whole settings file as the builder wrote it at start, with
    /// `toml` after the `[server]` table.
    pub fn config_text(&self, toml: &str) -> String {
        format!("{}{toml}", self.server_table)
    }
}

/// Starts a test gateway ([`TestGateway`] in process, [`GatewayProcess`]
/// for the binary). It always writes the `[server]` table itself: `listen`
/// (port 0 in process, a free port for the binary), `workers`, then the
/// lines given with [`GatewayBuilder::server`]; the test's configuration
/// follows, from its first table on. A `[server]` table of the test's own
/// would be a duplicate and fails to load: its keys go through `server`.
pub struct GatewayBuilder<G> {
    workers: usize,
    server: String,
    env: Vec<(String, String)>,
    gateway: std::marker::PhantomData<fn() -> G>,
}

impl<G> GatewayBuilder<G> {
    fn new(workers: usize) -> Self {
        Self {
            workers,
            server: String::new(),
            env: Vec::new(),
            gateway: std::marker::PhantomData,
        }
    }

    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Lines for the `[server]` table, e.g. `max_body_bytes = 1000`.
    pub fn server(mut self, lines: &str) -> Self {
        self.server.push_str(lines);
        self.server.push('\n');
        self
    }

    /// The whole configuration, `[server]` table and all, listening on `listen`.
    fn config(&self, listen: SocketAddr, toml: &str) -> String {
        format!("{}{toml}", self.server_table(listen))
    }

    fn server_table(&self, listen: SocketAddr) -> String {
        format!(
            "[server]\nlisten = \"{listen}\"\nworkers = {}\n{}",
            self.workers, self.server
        )
    }
}

impl GatewayBuilder<TestGateway> {
    /// Starts the gateway in this process with `toml` after the `[server]` table.
    pub fn start(self, toml: &str) -> TestGateway {
        let listen = ([127, 0, 0, 1], 0).into();
        let dir = settings_dir(&self.config(listen, toml));
        let settings = load_settings(dir.path());
        let sources = sources_of(dir.path());
        let (server, (address, tls_address, reloader)) = ServerThread::spawn(move || {
            let application = Application::build(&settings, sources).expect("gateway starts");
            let address = application.address().expect("test gateways listen in plain HTTP too");
            let (tls_address, handle) = (application.tls_address(), application.handle());
            (
                (address, tls_address, application.reloader()),
                handle,
                application.run_until_stopped(),
            )
        });
        TestGateway {
            address,
            tls_address,
            server,
            reloader,
            settings_dir: dir,
            server_table: self.server_table(listen),
        }
    }
}

/// A client that shows what the gateway sent: no redirects followed, no
/// decompression, no default headers.
pub fn client() -> awc::Client {
    awc::Client::builder()
        .disable_redirects()
        .timeout(Duration::from_secs(30))
        .finish()
}

/// Status, headers and body of one response, read whole.
pub struct Reply {
    pub status: u16,
    pub headers: awc::http::header::HeaderMap,
    pub body: web::Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|err| panic!("body is not JSON ({err}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn read_reply(
    mut response: awc::ClientResponse<
        impl futures_util::Stream<Item = Result<web::Bytes, awc::error::PayloadError>> + Unpin,
    >,
) -> Reply {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .body()
        .limit(256 * 1024 * 1024)
        .await
        .expect("reading the body");
    Reply { status, headers, body }
}

/// `GET url`, read whole.
pub async fn get(url: &str) -> Reply {
    let response = client()
        .get(url)
        .no_decompress()
        .send()
        .await
        .expect("request reaches the gateway");
    read_reply(response).await
}

/// Sends raw bytes and returns everything read until the peer closes or
/// `timeout` passes.
pub fn raw_exchange(address: SocketAddr, request: &[u8], timeout: Duration) -> String {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(timeout)).unwrap();
    stream.write_all(request).unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 8192];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&received).into_owned()
}

/// Polls `condition` every 20 ms until it holds or `limit` passes.
pub async fn eventually(limit: Duration, mut condition: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition().await {
            return true;
        }
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
    condition().await
}

/// Resident set size of process `pid` in KiB, from `/proc/<pid>/status`;
/// `None` once it is gone.
pub fn rss_kib_of(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The real `gatehouse` binary, with its own settings directory, killed
/// when dropped. Its stderr goes to a file of its own (a pipe nobody reads
/// would fill up and stall the gateway's logging).
pub struct GatewayProcess {
    pub child: Child,
    pub address: SocketAddr,
    settings_dir: tempfile::TempDir,
    /// The `[server]` table as written at start.
    server_table: String,
    stderr: tempfile::NamedTempFile,
}

impl GatewayProcess {
    /// Starts the binary with the builder's defaults and `env`, and waits
    /// until it listens.
    pub fn start(toml: &str, env: &[(&str, &str)]) -> Self {
        let mut builder = Self::builder();
        for (name, value) in env {
            builder = builder.env(name, value);
        }
        builder.start(toml)
    }

    /// One worker on a free loopback port, `GATEHOUSE_ENV=test`,
    /// `GATEHOUSE_LOG=warn`, unless told otherwise.
    pub fn builder() -> GatewayBuilder<Self> {
        GatewayBuilder::new(1)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The gateway's `default.toml` layer.
    pub fn settings_file(&self) -> PathBuf {
        self.settings_dir.path().join("default.toml")
    }

    /// The whole settings file as the builder wrote it at start, with
    /// `toml` after the `[server]` table.
    pub fn config_text(&self, toml: &str) -> String {
        format!("{}{toml}", self.server_table)
    }

    /// Resident set size in KiB, from `/proc/<pid>/status`.
    pub fn rss_kib(&self) -> u64 {
        rss_kib_of(self.pid()).expect("VmRSS in /proc status")
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGTERM, then SIGKILL if it has not exited within 10 s; everything it
    /// logged.
    pub fn stop_and_read_log(&mut self) -> String {
        if self.child.try_wait().unwrap().is_none() {
            self.signal("TERM");
            if self.wait_exit(Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl GatewayBuilder<GatewayProcess> {
    /// An environment variable for the binary (set after the defaults).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Starts the binary on a free port with `toml` after the `[server]`
    /// table, and waits until it listens.
    pub fn start(self, toml: &str) -> GatewayProcess {
        let address: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let dir = settings_dir(&self.config(address, toml));
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_gatehouse"));
        command
            .env("GATEHOUSE_SETTINGS_DIR", dir.path())
            .env("GATEHOUSE_ENV", "test")
            .env("GATEHOUSE_LOG", "warn")
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdout(Stdio::null())
            .stderr(stderr.reopen().unwrap());
        let child = command.spawn().expect("the gatehouse binary starts");
        let process = GatewayProcess {
            child,
            address,
            settings_dir: dir,
            server_table: self.server_table(address),
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(address).is_err() {
            assert!(Instant::now() < deadline, "gatehouse did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        process
    }
}

/// A free loopback port (bound, then released), for a server to take.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// Service `name` with `urls`, behind the route `prefix` (also named `name`).
pub fn service_at(name: &str, prefix: &str, urls: &[String]) -> String {
    let urls: Vec<String> = urls.iter().map(|url| format!("{url:?}")).collect();
    format!(
        "[services.{name}]\ninstances = [{}]\n[routes.{name}]\nprefix = \"{prefix}\"\nservice = \"{name}\"\n",
        urls.join(", ")
    )
}

/// helmet's defaults, as SPEC §3 lists them.
pub const SECURITY_HEADERS: [(&str, &str); 12] = [
    (
        "content-security-policy",
        "default-src 'self';base-uri 'self';font-src 'self' https: data:;form-action 'self';frame-ancestors 'self';img-src 'self' data:;object-src 'none';script-src 'self';script-src-attr 'none';style-src 'self' https: 'unsafe-inline';upgrade-insecure-requests",
    ),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
    ("origin-agent-cluster", "?1"),
    ("referrer-policy", "no-referrer"),
    ("strict-transport-security", "max-age=31536000; includeSubDomains"),
    ("x-content-type-options", "nosniff"),
    ("x-dns-prefetch-control", "off"),
    ("x-download-options", "noopen"),
    ("x-frame-options", "SAMEORIGIN"),
    ("x-permitted-cross-domain-policies", "none"),
    ("x-xss-protection", "0"),
];

// ---------------------------------------------------------------------------
// What the upstream saw, what the client got
// ---------------------------------------------------------------------------

/// Every value the upstream saw for `name`, in order.
pub fn values<'a>(seen: &'a SeenRequest, name: &str) -> Vec<&'a str> {
    seen.headers
        .get(name)
        .map(|values| values.iter().map(String::as_str).collect())
        .unwrap_or_default()
}

/// True for a lower-case hyphenated UUID such as the gateway generates.
pub fn is_uuid(text: &str) -> bool {
    text.len() == 36
        && text.char_indices().all(|(index, c)| match index {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The status line, headers and body of a raw HTTP/1.1 response.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Lower-cased names, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    pub fn parse(response: &str) -> Self {
        let (head, body) = response
            .split_once("\r\n\r\n")
            .filter(|(head, _)| !head.is_empty())
            .unwrap_or_else(|| panic!("no response head in {response:?}"));
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|line| line.split(' ').nth(1))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {response:?}"));
        let headers = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        Self {
            status,
            headers,
            body: body.to_owned(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header, _)| header == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Sends `head` (lines without the final blank line) and reads the answer
/// until the gateway closes the connection (the request says `close`).
pub fn raw_request(gateway: &TestGateway, head: &[&str]) -> RawResponse {
    let request = format!("{}\r\n\r\n", head.join("\r\n"));
    RawResponse::parse(&raw_exchange(
        gateway.address,
        request.as_bytes(),
        Duration::from_secs(10),
    ))
}

// ---------------------------------------------------------------------------
// /health
// ---------------------------------------------------------------------------

/// In Prometheus text, the value of the first sample of `name` carrying every `label="value"`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} ")))
        .find(|line| {
            labels
                .iter()
                .all(|(label, value)| line.contains(&format!("{label}=\"{value}\"")))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// `GET /health`, which is always 200 and JSON.
pub async fn health(gateway: &TestGateway) -> serde_json::Value {
    let reply = health_reply(gateway).await;
    reply.json()
}

/// `GET /health`, asserted to be 200, read whole.
pub async fn health_reply(gateway: &TestGateway) -> Reply {
    let reply = get(&gateway.url("/health")).await;
    assert_eq!(reply.status, 200, "/health is 200 whatever the state");
    reply
}

/// The `/health` entry of the instance `url` of `service`.
pub fn instance<'a>(report: &'a serde_json::Value, service: &str, url: &str) -> &'a serde_json::Value {
    report["services"][service]["instances"]
        .as_array()
        .unwrap_or_else(|| panic!("no service {service} in {report}"))
        .iter()
        .find(|instance| instance["url"] == url)
        .unwrap_or_else(|| panic!("no instance {url} of {service} in {report}"))
}

// ---------------------------------------------------------------------------
// Instances that misbehave on a raw socket
// ---------------------------------------------------------------------------

/// How a [`RawInstance`] treats each connection once it has read the head.
#[derive(Clone)]
pub enum Behaviour {
    /// Waits, then closes without a byte of response: a reset before the head.
    CloseAfter(Duration),
    /// Keeps the connection open and never answers.
    Hold,
    /// Writes these bytes, whatever the request, then closes.
    Answer(&'static [u8]),
    /// Writes these bytes, then keeps the connection open and silent.
    AnswerThenHold(&'static [u8]),
    /// Lets the test write the answer: it gets the request head (without
    /// the blank line) and the connection, which closes when it returns.
    /// For what no HTTP server library would send (120 header lines, a
    /// garbled status line, a body that pauses).
    Script(Arc<Answer>),
}

pub type Answer = dyn Fn(&str, &mut TcpStream) + Send + Sync;

/// An instance on a raw loopback listener that accepts every connection on a
/// thread of its own, reads the request head and then behaves as told.
/// Keeps the heads of the requests other than health probes. Dropping it
/// closes the listener and every connection, and ends its threads.
pub struct RawInstance {
    pub address: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl RawInstance {
    /// Misbehaves on health probes too: its first probe fails, so the
    /// gateway marks it unhealthy at once.
    pub fn start(behaviour: Behaviour) -> Self {
        Self::spawn(behaviour, false)
    }

    /// Answers `GET /health` with 200 and misbehaves on every other request:
    /// healthy for the probes, failing for proxied requests.
    pub fn start_passing_probes(behaviour: Behaviour) -> Self {
        Self::spawn(behaviour, true)
    }

    /// Passes its probes and answers every other request with `answer`.
    pub fn scripted(answer: impl Fn(&str, &mut TcpStream) + Send + Sync + 'static) -> Self {
        Self::spawn(Behaviour::Script(Arc::new(answer)), true)
    }

    fn spawn(behaviour: Behaviour, probes_pass: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopped) = (heads.clone(), stop.clone());
        let acceptor = std::thread::spawn(move || {
            let mut connections = Vec::new();
            while !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (seen, stopped, behaviour) = (seen.clone(), stopped.clone(), behaviour.clone());
                        connections.push(std::thread::spawn(move || {
                            serve_raw(stream, &behaviour, probes_pass, &seen, &stopped)
                        }));
                    }
                    Err(err) if err.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => break,
                }
            }
            drop(listener);
            for connection in connections {
                let _ = connection.join();
            }
        });
        Self {
            address,
            heads,
            stop,
            acceptor: Some(acceptor),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Proxied requests (not probes) whose head reached this instance.
    pub fn requests(&self) -> usize {
        self.heads.lock().unwrap().len()
    }

    /// Their heads, in arrival order.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

impl Drop for RawInstance {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            join_within(acceptor, STOP_LIMIT, "a raw instance");
        }
    }
}

fn serve_raw(
    mut stream: TcpStream,
    behaviour: &Behaviour,
    probes_pass: bool,
    seen: &Mutex<Vec<String>>,
    stopped: &AtomicBool,
) {
    stream.set_nonblocking(false).unwrap();
    // Short reads, so that a connection whose head never comes still sees
    // the stop; 5 s for the head at most.
    stream.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let give_up = Instant::now() + Duration::from_secs(5);
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buffer[..n]),
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stopped.load(Ordering::SeqCst) || Instant::now() >= give_up {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    // A probe of `/health`, under an instance base path too.
    let probe = head
        .strip_prefix(b"GET /")
        .and_then(|rest| rest.split(|byte| *byte == b' ').next())
        .is_some_and(|path| path == b"health" || path.ends_with(b"/health"));
    if probe && probes_pass {
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    }
    let head = String::from_utf8_lossy(&head);
    let head = head.split("\r\n\r\n").next().unwrap_or_default();
    if !head.is_empty() && !probe {
        seen.lock().unwrap().push(head.to_owned());
    }
    match behaviour {
        Behaviour::CloseAfter(wait) => pause(*wait, stopped),
        Behaviour::Hold => pause(Duration::from_secs(30), stopped),
        Behaviour::Answer(bytes) => {
            let _ = stream.write_all(bytes);
        }
        Behaviour::AnswerThenHold(bytes) => {
            let _ = stream.write_all(bytes);
            pause(Duration::from_secs(30), stopped);
        }
        Behaviour::Script(answer) => answer(head, &mut stream),
    }
    drop(stream);
}

/// Sleeps for `wait`, or until `stopped` is set.
fn pause(wait: Duration, stopped: &AtomicBool) {
    let until = Instant::now() + wait;
    while !stopped.load(Ordering::SeqCst) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10).min(until.saturating_duration_since(Instant::now())));
    }
}

// ---------------------------------------------------------------------------
// A real Redis
// ---------------------------------------------------------------------------

/// The key names `redis-cli --raw keys …` printed, sorted.
pub fn sorted_keys(output: &str) -> Vec<String> {
    let mut keys: Vec<String> = output
        .lines()
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect();
    keys.sort();
    keys
}

/// A raw `PING` to a Redis on loopback `port`: true on `+PONG` (a node that
/// is loading, or a port someone else holds, answers otherwise or not at all).
pub fn answers_ping(port: u16) -> bool {
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// A `redis-server` child process on a loopback port of its own, without
/// automatic persistence (only `restart_keeping_data` saves), killed when
/// dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts on a free port and waits until it answers PING.
    pub fn start() -> Self {
        for _ in 0..5 {
            let mut server = Self {
                port: free_port(),
                child: None,
                dir: tempfile::tempdir().unwrap(),
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server did not start on a free port");
    }

    /// Spawns on `self.port`; false if it exited (port taken) or never answered.
    fn spawn(&mut self) -> bool {
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.answers_ping() {
                self.child = Some(child);
                return true;
            }
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A raw `PING` over TCP.
    pub fn answers_ping(&self) -> bool {
        answers_ping(self.port)
    }

    /// SIGKILL: no goodbye to the gateways' connections, no save.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills it if it runs, then starts it again, empty, on the same port.
    /// Spawns again on the same port and folder, waiting up to 10 s for the
    /// port to be free.
    fn spawn_again(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not restart on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        // What an earlier `restart_keeping_data` saved would be loaded.
        let _ = std::fs::remove_file(self.dir.path().join("dump.rdb"));
        self.spawn_again();
    }

    /// `SHUTDOWN SAVE`, then starts it again on the same port and directory,
    /// where it loads the `dump.rdb` it wrote: a restart with persistence,
    /// keys and their TTLs kept, scripts forgotten and every client
    /// connection closed.
    pub fn restart_keeping_data(&mut self) {
        let mut child = self.child.take().expect("redis-server runs");
        // redis-cli reports nothing useful here: the server closes the
        // connection as it exits.
        let _ = Command::new("redis-cli")
            .arg("-p")
            .arg(self.port.to_string())
            .args(["shutdown", "save"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        let exited = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("redis-server did not exit after SHUTDOWN SAVE");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(exited.success(), "SHUTDOWN SAVE failed: {exited}");
        assert!(
            self.dir.path().join("dump.rdb").exists(),
            "SHUTDOWN SAVE wrote no dump.rdb"
        );
        self.spawn_again();
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis-server runs");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} redis-server");
    }

    /// SIGSTOP: connections are accepted by the kernel but nothing answers.
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    pub fn thaw(&self) {
        self.signal("CONT");
    }

    /// `redis-cli -p PORT args…`, its output trimmed (one connection each).
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .arg("-p")
            .arg(self.port.to_string())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli is installed");
        assert!(output.status.success(), "redis-cli {args:?}: {output:?}");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// The keys under `prefix`, sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        sorted_keys(&self.cli(&["--raw", "keys", &format!("{prefix}:*")]))
    }

    pub fn zcard(&self, key: &str) -> u64 {
        self.cli(&["--raw", "zcard", key]).parse().unwrap()
    }

    pub fn pttl(&self, key: &str) -> i64 {
        self.cli(&["--raw", "pttl", key]).parse().unwrap()
    }

    /// `total_connections_received` of `INFO stats` (this call's included).
    pub fn connections_received(&self) -> u64 {
        self.cli(&["info", "stats"])
            .lines()
            .find_map(|line| line.strip_prefix("total_connections_received:"))
            .and_then(|value| value.trim().parse().ok())
            .expect("total_connections_received in INFO stats")
    }

    /// The `calls` of `cmdstat_<command>` in `INFO commandstats`; 0 if absent.
    pub fn calls(&self, command: &str) -> u64 {
        let prefix = format!("cmdstat_{command}:");
        self.cli(&["info", "commandstats"])
            .lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .and_then(|stats| stats.split(',').find_map(|field| field.strip_prefix("calls=")))
            .map_or(0, |calls| calls.parse().unwrap())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A frozen server ignores SIGKILL until continued on some systems.
            let _ = Command::new("kill").arg("-CONT").arg(child.id().to_string()).status();
        }
        self.kill();
    }
}

// ---------------------------------------------------------------------------
// The binary, run to its end
// ---------------------------------------------------------------------------

/// Variables the binary reads besides the `GATEHOUSE__…` ones.
pub const INHERITED_VARS: [&str; 13] = [
    "GATEHOUSE_SETTINGS_DIR",
    "GATEHOUSE_ENV",
    "GATEHOUSE_LOG",
    "GATEHOUSE_LOG_FORMAT",
    "RUST_LOG",
    "NO_COLOR",
    "JWT_SECRET",
    "REDIS_URL",
    "USER_SERVICE_URL",
    "PRODUCT_SERVICE_URL",
    "ORDER_SERVICE_URL",
    "ADMIN_SERVICE_URL",
    "CLICOLOR_FORCE",
];

/// A command for the binary with a clean environment: `settings` as the
/// settings directory (and working directory), `environment` as
/// `GATEHOUSE_ENV` (`None`: unset).
pub fn gatehouse_command(settings: &Path, environment: Option<&str>) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gatehouse"));
    for name in INHERITED_VARS {
        command.env_remove(name);
    }
    for (name, _) in std::env::vars() {
        if name.starts_with("GATEHOUSE__") {
            command.env_remove(name);
        }
    }
    command
        .env("GATEHOUSE_SETTINGS_DIR", settings)
        .current_dir(settings)
        .stdin(Stdio::null());
    if let Some(environment) = environment {
        command.env("GATEHOUSE_ENV", environment);
    }
    command
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn both(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs `command` to its end; kills it (and fails) after `limit`.
pub fn finish(mut command: Command, limit: Duration) -> Finished {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the gatehouse binary starts");
    let pid = child.id();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    let output = match receiver.recv_timeout(limit) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
            let output = receiver.recv().unwrap().unwrap();
            panic!(
                "gatehouse did not exit within {limit:?}; stdout: {}\nstderr: {}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    };
    Finished {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `gatehouse <args>` with a clean environment plus `vars`, run to its end
/// (20 s at most).
pub fn run_gatehouse(settings: &Path, environment: Option<&str>, vars: &[(&str, &str)], args: &[&str]) -> Finished {
    let mut command = gatehouse_command(settings, environment);
    command.args(args).envs(vars.iter().copied());
    finish(command, Duration::from_secs(20))
}
