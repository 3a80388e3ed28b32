//! Forwarding (SPEC §3 steps 1, 7 and 8): what the upstream receives, and
//! what the client gets back, through real sockets.

use std::cell::RefCell;
use std::io::Read;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::web::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use crate::helpers::*;

/// One service `api` behind the route `/api`.
fn one_service(upstream: &Upstream) -> String {
    format!(
        "[services.api]\ninstances = {}\n[routes.api]\nprefix = \"/api\"\nservice = \"api\"\n",
        instances(&[upstream])
    )
}

/// A gateway in front of [`one_service`] that trusts loopback peers as proxies.
fn behind_trusted_proxies(upstream: &Upstream) -> TestGateway {
    TestGateway::builder()
        .server("trusted_proxies = [\"127.0.0.0/8\"]")
        .start(&one_service(upstream))
}

// Step 7: hop-by-hop headers.

#[actix_web::test]
async fn hop_by_hop_headers_and_the_headers_connection_names_are_not_forwarded() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&one_service(&upstream));

    let reply = raw_request(
        &gateway,
        &[
            "GET /api/hop?x=1 HTTP/1.1",
            "Host: gateway.test",
            "Connection: close, X-Secret, x-other-secret",
            "Keep-Alive: timeout=5",
            "Proxy-Authorization: Basic Zm9vOmJhcg==",
            "Proxy-Authenticate: Basic",
            "Proxy-Connection: keep-alive",
            "TE: trailers",
            "Trailer: X-Checksum",
            "Upgrade: foo/1",
            "x-secret: 1",
            "X-OTHER-SECRET: 2",
            "X-Kept: yes",
        ],
    );
    assert_eq!(reply.status, 200);

    let seen = upstream.last_seen();
    assert_eq!(seen.target, "/api/hop?x=1");
    for name in [
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ] {
        assert_eq!(seen.header(name), None, "hop-by-hop {name} was forwarded");
    }
    assert_eq!(
        seen.header("x-secret"),
        None,
        "a header named in Connection (other case) was forwarded"
    );
    assert_eq!(
        seen.header("x-other-secret"),
        None,
        "a header named in Connection (other case) was forwarded"
    );
    assert_eq!(seen.header("x-kept"), Some("yes"), "end-to-end headers pass");
}

#[actix_web::test]
async fn connection_cannot_make_the_gateway_drop_its_own_headers() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&one_service(&upstream));

    let reply = raw_request(
        &gateway,
        &[
            "GET /api/own HTTP/1.1",
            "Host: gateway.test",
            "Connection: close, X-Request-Id, X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host",
        ],
    );
    assert_eq!(reply.status, 200);
    let request_id = reply.header("x-request-id").expect("x-request-id on the response");
    assert!(is_uuid(request_id), "{request_id:?} is not a UUID");

    let seen = upstream.last_seen();
    assert_eq!(seen.header("x-request-id"), Some(request_id));
    assert_eq!(values(&seen, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(values(&seen, "x-forwarded-proto"), ["http"]);
    assert_eq!(values(&seen, "x-forwarded-host"), ["gateway.test"]);
}

// Step 7: Host and X-Forwarded-*.

#[actix_web::test]
async fn host_is_the_instance_and_x_forwarded_host_is_what_the_client_asked_for() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&one_service(&upstream));

    let response = client()
        .get(gateway.url("/api/where"))
        .insert_header(("host", "public.example:8443"))
        .send()
        .await
        .unwrap();
    assert_eq!(read_reply(response).await.status, 200);

    let seen = upstream.last_seen();
    assert_eq!(values(&seen, "host"), [upstream.address.to_string()]);
    assert_eq!(values(&seen, "x-forwarded-host"), ["public.example:8443"]);
    assert_eq!(values(&seen, "x-forwarded-proto"), ["http"]);
}

#[actix_web::test]
async fn an_untrusted_peer_cannot_claim_another_address() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&one_service(&upstream));

    let response = client()
        .get(gateway.url("/api/who"))
        .insert_header(("x-forwarded-for", "6.6.6.6"))
        .insert_header(("forwarded", "for=6.6.6.6"))
        .insert_header(("x-real-ip", "6.6.6.6"))
        .insert_header(("x-forwarded-proto", "https"))
        .insert_header(("x-forwarded-host", "evil.example"))
        .send()
        .await
        .unwrap();
    assert_eq!(read_reply(response).await.status, 200);

    let seen = upstream.last_seen();
    assert_eq!(values(&seen, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(seen.header("forwarded"), None);
    assert_eq!(seen.header("x-real-ip"), None);
    assert_eq!(values(&seen, "x-forwarded-proto"), ["http"]);
    assert_eq!(
        values(&seen, "x-forwarded-host"),
        [gateway.address.to_string()],
        "X-Forwarded-Host is the Host the client used"
    );
}

#[actix_web::test]
async fn a_trusted_proxy_gets_the_peer_appended_to_its_x_forwarded_for() {
    let upstream = Upstream::start("api");
    let gateway = behind_trusted_proxies(&upstream);

    let response = client()
        .get(gateway.url("/api/who"))
        .insert_header(("x-forwarded-for", "6.6.6.6"))
        .send()
        .await
        .unwrap();
    assert_eq!(read_reply(response).await.status, 200);
    assert_eq!(values(&upstream.last_seen(), "x-forwarded-for"), ["6.6.6.6, 127.0.0.1"]);

    let response = client()
        .get(gateway.url("/api/who"))
        .append_header(("x-forwarded-for", "6.6.6.6"))
        .append_header(("x-forwarded-for", "7.7.7.7"))
        .send()
        .await
        .unwrap();
    assert_eq!(read_reply(response).await.status, 200);
    assert_eq!(
        values(&upstream.last_seen(), "x-forwarded-for"),
        ["6.6.6.6, 7.7.7.7, 127.0.0.1"],
        "several incoming lines are joined in order, then the peer"
    );

    let response = client().get(gateway.url("/api/who")).send().await.unwrap();
    assert_eq!(read_reply(response).await.status, 200);
    assert_eq!(
        values(&upstream.last_seen(), "x-forwarded-for"),
        ["127.0.0.1"],
        "without an incoming value it is just the peer"
    );
}

// Step 7: identity headers.

#[actix_web::test]
async fn client_sent_identity_headers_never_reach_the_upstream() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&one_service(&upstream));

    let response = client()
        .get(gateway.url("/api/me"))
        .insert_header(("X-User-Id", "admin"))
        .insert_header(("X-User-Roles", "admin,root"))
        .send()
        .await
        .unwrap();
    assert_eq!(read_reply(response).await.status, 200);

    let seen = upstream.last_seen();
    assert_eq!(seen.header("x-user-id"), None);
    assert_eq!(seen.header("x-user-roles"), None);
}

// Step 1: request ids.

#[actix_web::test]
async fn a_valid_request_id_is_kept_on_the_response_and_upstream() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&one_service(&upstream));

    for id in ["abc-123", "A.b_c-9", &"x".repeat(128)] {
        let response = client()
            .get(gateway.url("/api/id"))
            .insert_header(("x-request-id", id))
            .send()
            .await
            .unwrap();
        let reply = read_reply(response).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-request-id"), Some(id));
        assert_eq!(values(&upstream.last_seen(), "x-request-id"), [id]);
    }
}

#[actix_web::test]
async fn an_invalid_request_id_is_replaced_by_a_new_uuid() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&one_service(&upstream));

    for id in ["bad id!", &"a".repeat(129), "semi;colon", ""] {
        let response = client()
            .get(gateway.url("/api/id"))
            .insert_header(("x-request-id", id))
            .send()
            .await
            .unwrap();
        let reply = read_reply(response).await;
        assert_eq!(reply.status, 200);
        let replaced = reply.header("x-request-id").expect("x-request-id");
        assert!(is_uuid(replaced), "{id:?} was answered with {replaced:?}");
        assert_eq!(values(&upstream.last_seen(), "x-request-id"), [replaced]);
    }
}

#[actix_web::test]
async fn a_request_without_an_id_gets_a_fresh_uuid() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&one_service(&upstream));

    let first = get(&gateway.url("/api/id")).await;
    let first_id = first.header("x-request-id").expect("x-request-id");
    assert!(is_uuid(first_id), "{first_id:?} is not a UUID");
    assert_eq!(values(&upstream.last_seen(), "x-request-id"), [first_id]);

    let second = get(&gateway.url("/api/id")).await;
    let second_id = second.header("x-request-id").expect("x-request-id");
    assert!(is_uuid(second_id));
    assert_ne!(first_id, second_id, "every request gets its own id");
    assert_eq!(values(&upstream.last_seen(), "x-request-id"), [second_id]);
}

// Step 7 and 8: bodies, status and headers pass as they are.

#[actix_web::test]
async fn a_compressed_body_reaches_the_client_unchanged() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&one_service(&upstream));

    let response = client()
        .get(gateway.url("/api/gzip"))
        .insert_header(("accept-encoding", "gzip"))
        .no_decompress()
        .send()
        .await
        .unwrap();
    let reply = read_reply(response).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-encoding"), Some("gzip"));
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(
        reply.header("content-length"),
        Some(reply.body.len().to_string().as_str())
    );
    assert_eq!(&reply.body[..2], [0x1f, 0x8b], "still gzip on the wire");
    let mut decompressed = String::new();
    flate2::read::GzDecoder::new(&reply.body[..])
        .read_to_string(&mut decompressed)
        .expect("the body is the upstream's gzip stream");
    assert_eq!(decompressed, r#"{"compressed":true}"#);
    assert_eq!(values(&upstream.last_seen(), "accept-encoding"), ["gzip"]);
}

#[actix_web::test]
async fn an_upstream_redirect_goes_back_to_the_client_unfollowed() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&one_service(&upstream));

    let reply = get(&gateway.url("/api/redirect")).await;
    assert_eq!(reply.status, 302);
    assert_eq!(reply.header("location"), Some("/elsewhere"));
    assert_eq!(upstream.hits(), 1, "the gateway did not follow the redirect");
    assert_eq!(upstream.last_seen().target, "/api/redirect");
}

#[actix_web::test]
async fn the_gateway_invents_no_content_type() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&one_service(&upstream));

    let reply = get(&gateway.url("/api/bare")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), None);
    assert_eq!(reply.text(), "plain bytes");
}

#[actix_web::test]
async fn method_query_and_body_are_kept() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&one_service(&upstream));
    let body = r#"{"name":"widget","tags":["a","b"],"price":12.5}"#;

    let response = client()
        .post(gateway.url("/api/items?sort=desc&q=a%20b&empty="))
        .insert_header(("content-type", "application/json"))
        .send_body(body)
        .await
        .unwrap();
    let reply = read_reply(response).await;
    assert_eq!(reply.status, 200);

    let seen = upstream.last_seen();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.target, "/api/items?sort=desc&q=a%20b&empty=");
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(seen.body_len, body.len());
    assert_eq!(seen.body_sha256, hex(&Sha256::digest(body.as_bytes())));
    assert_eq!(values(&seen, "content-length"), [body.len().to_string()]);

    let response = client().delete(gateway.url("/api/items/7")).send().await.unwrap();
    assert_eq!(read_reply(response).await.status, 200);
    let seen = upstream.last_seen();
    assert_eq!(seen.method, "DELETE");
    assert_eq!(seen.target, "/api/items/7");
    assert_eq!(seen.body_len, 0);
}

#[actix_web::test]
async fn head_keeps_the_upstream_length_and_sends_no_body() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&one_service(&upstream));

    let response = client().head(gateway.url("/api/download/1000")).send().await.unwrap();
    let reply = read_reply(response).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-length"), Some("1000"));
    assert!(reply.body.is_empty(), "HEAD answered with a body");
    assert_eq!(upstream.last_seen().method, "HEAD");

    // The connection is still usable: no stray body bytes were written.
    let reply = raw_request(
        &gateway,
        &[
            "HEAD /api/download/1000 HTTP/1.1",
            "Host: gateway.test",
            "Connection: close",
        ],
    );
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-length"), Some("1000"));
}

/// A loopback upstream that answers every request on every connection
/// with the same raw `response` bytes, then closes.
fn raw_upstream(response: &'static str) -> RawInstance {
    RawInstance::start(Behaviour::Answer(response.as_bytes()))
}

#[actix_web::test]
async fn hop_by_hop_headers_of_the_upstream_response_are_not_returned() {
    let upstream = raw_upstream(concat!(
        "HTTP/1.1 200 OK\r\n",
        "Content-Length: 2\r\n",
        "Connection: close, X-Upstream-Secret\r\n",
        "Keep-Alive: timeout=5\r\n",
        "Proxy-Authenticate: Basic realm=\"upstream\"\r\n",
        "Trailer: X-Checksum\r\n",
        "X-UPSTREAM-SECRET: 1\r\n",
        "Set-Cookie: a=1\r\n",
        "Set-Cookie: b=2\r\n",
        "X-Kept: yes\r\n",
        "\r\n",
        "ok",
    ));
    let gateway = TestGateway::start(&format!(
        "[services.api]\ninstances = [\"{}\"]\n[routes.api]\nprefix = \"/api\"\nservice = \"api\"\n",
        upstream.url()
    ));

    let reply = get(&gateway.url("/api/hop")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "ok");
    for name in ["keep-alive", "proxy-authenticate", "trailer", "x-upstream-secret"] {
        assert_eq!(reply.header(name), None, "{name} reached the client");
    }
    assert_ne!(
        reply.header("connection"),
        Some("close, X-Upstream-Secret"),
        "the upstream's Connection reached the client"
    );
    assert_eq!(reply.header("x-kept"), Some("yes"));
    let cookies: Vec<_> = reply.headers.get_all("set-cookie").collect();
    assert_eq!(cookies, ["a=1", "b=2"], "repeated headers all pass, in order");
}

// Step 8 and the security headers.

/// Every helmet header exactly once, except those in `upstream_own`.
fn assert_security_headers(reply: &Reply, what: &str, upstream_own: &[&str]) {
    for (name, value) in SECURITY_HEADERS {
        if upstream_own.contains(&name) {
            continue;
        }
        let all: Vec<_> = reply.headers.get_all(name).collect();
        assert_eq!(all.len(), 1, "{what}: {name} should appear once: {all:?}");
        assert_eq!(reply.header(name), Some(value), "{what}: {name}");
    }
    assert_eq!(reply.header("server"), None, "{what}: a Server header");
    assert_eq!(reply.header("x-powered-by"), None, "{what}: X-Powered-By");
}

#[actix_web::test]
async fn security_headers_are_on_proxied_responses_errors_and_health() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&one_service(&upstream));

    let proxied = get(&gateway.url("/api/anything")).await;
    assert_eq!(proxied.status, 200);
    assert_security_headers(&proxied, "proxied", &[]);

    let not_found = get(&gateway.url("/nowhere")).await;
    assert_eq!(not_found.status, 404);
    assert_security_headers(&not_found, "404", &[]);

    let health = get(&gateway.url("/health")).await;
    assert_eq!(health.status, 200);
    assert_security_headers(&health, "/health", &[]);

    let redirect = get(&gateway.url("/api/redirect")).await;
    assert_eq!(redirect.status, 302);
    assert_security_headers(&redirect, "proxied 302", &[]);
}

#[actix_web::test]
async fn the_upstreams_own_security_headers_win_and_its_server_headers_go() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&one_service(&upstream));

    let reply = get(&gateway.url("/api/own-headers")).await;
    assert_eq!(reply.status, 200);
    let csp: Vec<_> = reply.headers.get_all("content-security-policy").collect();
    assert_eq!(csp, ["default-src 'none'"]);
    let frame: Vec<_> = reply.headers.get_all("x-frame-options").collect();
    assert_eq!(frame, ["DENY"]);
    assert_security_headers(&reply, "own-headers", &["content-security-policy", "x-frame-options"]);
    assert_eq!(reply.json(), serde_json::json!({ "own": true }));
}

// Streaming: whole bodies are never held by the gateway.

/// Peak RSS of `pid` in KiB, sampled every few milliseconds on a thread
/// until [`RssSampler::finish`].
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<usize>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (stop_flag, peak_seen) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            let mut samples = 0;
            while !stop_flag.load(Ordering::SeqCst) {
                if let Some(rss) = rss_kib_of(pid) {
                    peak_seen.fetch_max(rss, Ordering::SeqCst);
                    samples += 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            samples
        });
        Self { stop, peak, thread }
    }

    fn record(&self, rss: u64) {
        self.peak.fetch_max(rss, Ordering::SeqCst);
    }

    /// (peak KiB, samples taken by the thread)
    fn finish(self) -> (u64, usize) {
        self.stop.store(true, Ordering::SeqCst);
        let samples = self.thread.join().unwrap();
        (self.peak.load(Ordering::SeqCst), samples)
    }
}

/// `len` bytes of a non-repeating pattern, 64 KiB at a time, hashed as they
/// are generated into `hasher`.
fn upload_stream(
    len: usize,
    hasher: Rc<RefCell<Sha256>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + 'static {
    const CHUNK: usize = 64 * 1024;
    futures_util::stream::iter((0..len).step_by(CHUNK).map(move |start| {
        let end = (start + CHUNK).min(len);
        let chunk: Vec<u8> = (start..end)
            .map(|index| ((index as u32).wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        hasher.borrow_mut().update(&chunk);
        Ok(Bytes::from(chunk))
    }))
}

const MIB: usize = 1024 * 1024;

#[actix_web::test]
async fn fifty_mib_each_way_stream_through_the_binary_in_bounded_memory() {
    let upstream = Upstream::start("api");
    let gateway = GatewayProcess::start(
        &one_service(&upstream),
        &[("GATEHOUSE__SERVER__MAX_BODY_BYTES", "104857600")],
    );
    let big = client();

    // Warm up the worker and its upstream pool, then take the baseline.
    let warm_up = read_reply(big.get(gateway.url("/api/warm")).send().await.unwrap()).await;
    assert_eq!(warm_up.status, 200);
    let before = gateway.rss_kib();
    let sampler = RssSampler::start(gateway.pid());

    // Upload: generated and hashed chunk by chunk, never held whole.
    let size = 50 * MIB;
    let hasher = Rc::new(RefCell::new(Sha256::new()));
    let response = big
        .post(gateway.url("/api/upload"))
        .timeout(Duration::from_secs(600))
        .send_stream(upload_stream(size, hasher.clone()))
        .await
        .expect("the upload goes through");
    let reply = read_reply(response).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    sampler.record(gateway.rss_kib());
    let sent_sha256 = hex(&hasher.borrow().clone().finalize());
    let seen = upstream.last_seen();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.body_len, size);
    assert_eq!(seen.body_sha256, sent_sha256);

    // Download: hashed while it streams, never collected.
    let mut response = big
        .get(gateway.url(&format!("/api/download/{size}")))
        .timeout(Duration::from_secs(600))
        .send()
        .await
        .expect("the download starts");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("content-length")
            .and_then(|value| value.to_str().ok()),
        Some(size.to_string().as_str())
    );
    let mut received = 0;
    let mut next_sample = 0;
    let mut hasher = Sha256::new();
    while let Some(chunk) = response.next().await {
        let chunk = chunk.expect("the download streams without error");
        received += chunk.len();
        hasher.update(&chunk);
        if received >= next_sample {
            sampler.record(gateway.rss_kib());
            next_sample += MIB;
        }
    }
    assert_eq!(received, size);
    assert_eq!(hex(&hasher.finalize()), pattern_sha256(size));

    sampler.record(gateway.rss_kib());
    let (peak, samples) = sampler.finish();
    let after = gateway.rss_kib();
    eprintln!("gateway RSS: before {before} KiB, peak {peak} KiB ({samples} samples), after {after} KiB");
    assert!(samples > 0, "RSS was never sampled");
    assert!(
        peak < 60 * 1024,
        "gateway RSS peaked at {peak} KiB while moving 50 MiB each way"
    );
    assert!(
        peak.saturating_sub(before) < 25 * 1024,
        "gateway RSS grew from {before} KiB to {peak} KiB while moving 50 MiB each way"
    );
    assert!(
        after.saturating_sub(before) < 25 * 1024,
        "gateway RSS stayed at {after} KiB (from {before} KiB) after the transfers"
    );
}

#[actix_web::test]
async fn a_chunked_upstream_response_streams_through_intact() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&one_service(&upstream));
    let size = 3 * MIB + 12_345;

    let mut response = client()
        .get(gateway.url(&format!("/api/chunked/{size}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers().get("content-length"), None);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok()),
        Some("application/octet-stream")
    );
    let mut received = 0;
    let mut hasher = Sha256::new();
    while let Some(chunk) = response.next().await {
        let chunk = chunk.expect("the body streams without error");
        received += chunk.len();
        hasher.update(&chunk);
    }
    assert_eq!(received, size);
    assert_eq!(hex(&hasher.finalize()), pattern_sha256(size));
}
