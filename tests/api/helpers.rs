//! Real parts for the integration tests: upstream HTTP servers on port 0, the
//! gateway in process (its own actix System on its own thread) or as the
//! real binary, an HTTP client that neither follows redirects nor
//! decompresses, and a raw TCP client for malformed requests.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use futures_util::StreamExt;
use gatehouse::settings::{Settings, Sources};
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
/// - anything else echoes JSON: instance, method, target, headers, body size and hash.
///
/// Every response carries `Server: upstream-server` and `X-Powered-By: Express`.
pub struct Upstream {
    pub name: String,
    pub address: SocketAddr,
    state: Arc<UpstreamState>,
    handle: ServerHandle,
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
        let (sender, receiver) = std::sync::mpsc::channel();
        let name_for_server = name.to_owned();
        let state_for_server = state.clone();
        std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let name = name_for_server.clone();
                let state = state_for_server.clone();
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(web::Data::new((name.clone(), state.clone())))
                        .default_service(web::to(upstream_handler))
                })
                .workers(2)
                .disable_signals()
                .shutdown_timeout(0)
                .listen(listener)
                .unwrap()
                .run();
                sender.send(server.handle()).unwrap();
                let _ = server.await;
            });
        });
        let handle = receiver.recv().unwrap();
        Self {
            name: name.to_owned(),
            address,
            state,
            handle,
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

    pub fn set_health(&self, status: u16) {
        self.state.health_status.store(status, Ordering::SeqCst);
    }

    /// Stops the server; its port then refuses connections.
    pub async fn stop(&self) {
        self.handle.stop(false).await;
    }
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

fn pattern_stream(len: usize) -> impl futures_util::Stream<Item = Result<web::Bytes, actix_web::Error>> {
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
    let mut hasher = Sha256::new();
    let mut body_len = 0;
    while let Some(chunk) = payload.next().await {
        let Ok(chunk) = chunk else { break };
        body_len += chunk.len();
        hasher.update(&chunk);
    }
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
        body_sha256: hex(&hasher.finalize()),
    };
    state.hits.fetch_add(1, Ordering::SeqCst);
    state.seen.lock().unwrap().push(seen.clone());

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
            response.no_chunking(len as u64).streaming(pattern_stream(len))
        }
        ("chunked", n) => {
            let len: usize = n.parse().unwrap_or(0);
            response.insert_header(("content-type", "application/octet-stream"));
            response.streaming(pattern_stream(len))
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

/// `["http://127.0.0.1:1", …]` for a service's `instances`.
pub fn instances(upstreams: &[&Upstream]) -> String {
    let urls: Vec<String> = upstreams.iter().map(|u| format!("{:?}", u.url())).collect();
    format!("[{}]", urls.join(", "))
}

/// A free loopback port nobody listens on (bound, then released).
pub fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// Writes `toml` as the only layer (`default.toml`) of a fresh settings directory.
pub fn settings_dir(toml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("default.toml"), toml).unwrap();
    dir
}

pub fn load_settings(dir: &Path) -> Settings {
    Settings::load(&Sources {
        settings_dir: dir.to_owned(),
        environment: "test".to_owned(),
        config_file: None,
        vars: Default::default(),
    })
    .unwrap_or_else(|err| panic!("test settings are invalid: {err}"))
}

/// The real gateway, in this process, on its own thread and actix System.
pub struct TestGateway {
    pub address: SocketAddr,
    handle: ServerHandle,
    _settings_dir: tempfile::TempDir,
}

impl TestGateway {
    /// `toml` is the whole configuration; `server.listen` should be
    /// `127.0.0.1:0` (it is set so when absent).
    pub fn start(toml: &str) -> Self {
        let toml = if toml.contains("listen") {
            toml.to_owned()
        } else {
            format!("[server]\nlisten = \"127.0.0.1:0\"\nworkers = 2\n{toml}")
        };
        let dir = settings_dir(&toml);
        let settings = load_settings(dir.path());
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let application = Application::build(&settings).expect("gateway starts");
                sender.send((application.address(), application.handle())).unwrap();
                let _ = application.run_until_stopped().await;
            });
        });
        let (address, handle) = receiver.recv().unwrap();
        Self {
            address,
            handle,
            _settings_dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub async fn stop(&self) {
        self.handle.stop(true).await;
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

/// The real `gatehouse` binary, with its own settings directory.
pub struct GatewayProcess {
    pub child: Child,
    pub address: SocketAddr,
    _settings_dir: tempfile::TempDir,
}

impl GatewayProcess {
    /// Starts the binary on a free port and waits until `/health` answers.
    pub fn start(toml: &str, env: &[(&str, &str)]) -> Self {
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let dir = settings_dir(&format!("[server]\nlisten = \"{address}\"\nworkers = 1\n{toml}"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_gatehouse"));
        command
            .env("GATEHOUSE_SETTINGS_DIR", dir.path())
            .env("GATEHOUSE_ENV", "test")
            .env("GATEHOUSE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command.spawn().expect("the gatehouse binary starts");
        let process = Self {
            child,
            address,
            _settings_dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(address).is_err() {
            assert!(Instant::now() < deadline, "gatehouse did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        process
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in KiB, from `/proc/<pid>/status`.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc status")
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
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
