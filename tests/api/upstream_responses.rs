//! What the client gets when an instance answers unusually (SPEC §3 step 7):
//! a head the gateway cannot parse, redirects that name the instance, a body
//! of unknown length for an HTTP/1.0 client, a body that pauses longer than
//! the head timeout (hardening.rs has the one that stalls), and routes that
//! turn the security headers off.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use crate::helpers::*;

/// `name` with `urls` behind `/api`, with extra route keys.
fn route_to(name: &str, urls: &[String], route_keys: &str) -> String {
    let urls: Vec<String> = urls.iter().map(|url| format!("{url:?}")).collect();
    format!(
        "[services.{name}]\ninstances = [{}]\n[routes.{name}]\nprefix = \"/api\"\nservice = \"{name}\"\n{route_keys}\n",
        urls.join(", ")
    )
}

/// A 200 with a short body and `extra` header lines.
fn ok_with(extra: &str) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\n{extra}Content-Length: 2\r\nConnection: close\r\n\r\nok").into_bytes()
}

/// The path of a request head's request line.
fn target_of(head: &str) -> &str {
    head.split(' ').nth(1).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// An answer the gateway cannot parse: 502, not retried, health untouched
// ---------------------------------------------------------------------------

/// An instance that answers `/api/many` with 120 header lines, `/api/garbled`
/// with a broken status line, and everything else with a plain 200.
fn instance_with_unparsable_answers() -> RawInstance {
    RawInstance::scripted(|head, stream| {
        let answer = match target_of(head) {
            "/api/many" => {
                let lines: String = (0..120).map(|i| format!("Set-Cookie: c{i}=v\r\n")).collect();
                ok_with(&lines)
            }
            "/api/garbled" => b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            _ => ok_with(""),
        };
        let _ = stream.write_all(&answer);
    })
}

#[actix_web::test]
async fn an_answer_with_more_header_lines_than_the_client_accepts_is_a_502_that_spares_the_instance() {
    let first = instance_with_unparsable_answers();
    let second = instance_with_unparsable_answers();
    let gateway = TestGateway::start(&format!(
        "[health]\ninterval_ms = 60000\npassive_failures = 2\n{}",
        route_to("api", &[first.url(), second.url()], "")
    ));

    for path in ["/api/many", "/api/garbled"] {
        for _ in 0..10 {
            let reply = get(&gateway.url(path)).await;
            assert_eq!(reply.status, 502, "{path}: {}", reply.text());
            assert_eq!(reply.header("content-type"), Some("application/json"));
            assert_eq!(
                reply.json(),
                serde_json::json!({"error": "Bad gateway", "service": "api"})
            );
            assert!(reply.header("x-request-id").is_some());
        }
    }
    let tries = |path: &str| {
        [&first, &second]
            .iter()
            .flat_map(|instance| instance.heads())
            .filter(|head| target_of(head) == path)
            .count()
    };
    assert_eq!(tries("/api/many"), 10, "each request went to one instance, no retry");
    assert_eq!(tries("/api/garbled"), 10, "each request went to one instance, no retry");

    let report = health(&gateway).await;
    for scripted in [&first, &second] {
        assert_eq!(instance(&report, "api", &scripted.url())["healthy"], true, "{report}");
    }
    for _ in 0..4 {
        let reply = get(&gateway.url("/api/fine")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let fine_on = |instance: &RawInstance| {
        instance
            .heads()
            .iter()
            .filter(|head| target_of(head) == "/api/fine")
            .count()
    };
    assert_eq!(
        (fine_on(&first), fine_on(&second)),
        (2, 2),
        "both instances still take turns"
    );
}

// ---------------------------------------------------------------------------
// Redirects go back through the gateway
// ---------------------------------------------------------------------------

/// An instance answering `/…/redirect?to=<location>` with a 302 to that
/// location (`{self}` stands for the instance's own URL) and a matching
/// `Content-Location`, and echoing the `Host` it received.
fn redirecting_instance() -> RawInstance {
    let own: std::sync::Arc<std::sync::OnceLock<String>> = Default::default();
    let own_for_answers = own.clone();
    let instance = RawInstance::scripted(move |head, stream| {
        let target = target_of(head);
        let location = target
            .split_once("?to=")
            .map(|(_, to)| to.replace("{self}", own_for_answers.get().unwrap()))
            .unwrap_or_default();
        let host = head
            .lines()
            .find_map(|line| line.strip_prefix("host: ").or_else(|| line.strip_prefix("Host: ")))
            .unwrap_or_default();
        let _ = stream.write_all(
            format!(
                "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Location: {location}\r\nX-Seen-Host: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        );
    });
    own.set(instance.url()).unwrap();
    instance
}

/// The `Location` the client gets when the instance redirects to `to`.
async fn location_for(gateway: &TestGateway, path: &str, to: &str) -> Reply {
    let reply = client()
        .get(gateway.url(&format!("{path}?to={to}")))
        .insert_header(("host", "gateway.example:8443"))
        .send()
        .await
        .expect("the gateway answers");
    let reply = read_reply(reply).await;
    assert_eq!(reply.status, 302, "{}", reply.text());
    assert_eq!(
        reply.header("location"),
        reply.header("content-location"),
        "Content-Location is rewritten like Location"
    );
    reply
}

#[actix_web::test]
async fn a_redirect_to_the_instance_points_back_at_the_gateway() {
    let instance = redirecting_instance();
    let gateway = TestGateway::start(&route_to("api", &[instance.url()], ""));

    let cases = [
        ("{self}/next?x=1", "http://gateway.example:8443/next?x=1"),
        ("{self}", "http://gateway.example:8443/"),
        ("{self}/", "http://gateway.example:8443/"),
        ("/next", "/next"),
        ("next", "next"),
        ("http://elsewhere.example/x", "http://elsewhere.example/x"),
        ("//elsewhere.example/x", "//elsewhere.example/x"),
    ];
    for (to, expected) in cases {
        let reply = location_for(&gateway, "/api/redirect", to).await;
        assert_eq!(reply.header("location"), Some(expected), "upstream Location {to:?}");
    }
}

#[actix_web::test]
async fn under_strip_prefix_redirects_get_the_route_prefix_back() {
    let instance = redirecting_instance();
    let gateway = TestGateway::start(&route_to("api", &[instance.url()], "strip_prefix = true"));

    let cases = [
        ("{self}/next?x=1", "http://gateway.example:8443/api/next?x=1"),
        ("{self}/", "http://gateway.example:8443/api/"),
        ("/next", "/api/next"),
        ("/", "/api/"),
        ("next", "next"),
        ("http://elsewhere.example/x", "http://elsewhere.example/x"),
    ];
    for (to, expected) in cases {
        let reply = location_for(&gateway, "/api/redirect", to).await;
        assert_eq!(reply.header("location"), Some(expected), "upstream Location {to:?}");
    }
}

#[actix_web::test]
async fn a_redirect_never_leaves_the_gateways_host_once_the_base_path_is_cut() {
    let instance = redirecting_instance();
    let gateway = TestGateway::start(&format!(
        "[services.based]\ninstances = [\"{}/v1\"]\n[routes.root]\nprefix = \"/\"\nservice = \"based\"\nstrip_prefix = true\n",
        instance.url()
    ));
    for (to, expected) in [
        ("/v1//evil.example/x", "/evil.example/x"),
        ("/v1/next", "/next"),
        (
            "{self}/v1//evil.example/x",
            "http://gateway.example:8443//evil.example/x",
        ),
    ] {
        let reply = location_for(&gateway, "/redirect", to).await;
        assert_eq!(reply.header("location"), Some(expected), "upstream Location {to:?}");
    }
}

#[actix_web::test]
async fn a_trusted_proxys_scheme_is_the_one_redirects_use() {
    let instance = redirecting_instance();
    let gateway = TestGateway::builder()
        .server("trusted_proxies = [\"127.0.0.0/8\"]")
        .start(&route_to("api", &[instance.url()], ""));
    let reply = client()
        .get(gateway.url("/api/redirect?to={self}/next"))
        .insert_header(("host", "gateway.example"))
        .insert_header(("x-forwarded-proto", "https"))
        .send()
        .await
        .unwrap();
    let reply = read_reply(reply).await;
    assert_eq!(reply.header("location"), Some("https://gateway.example/next"));
}

#[actix_web::test]
async fn preserve_host_sends_the_clients_host_and_leaves_redirects_alone() {
    let instance = redirecting_instance();
    let gateway = TestGateway::start(&route_to("api", &[instance.url()], "preserve_host = true"));

    let reply = location_for(&gateway, "/api/redirect", "{self}/next").await;
    assert_eq!(reply.header("x-seen-host"), Some("gateway.example:8443"));
    assert_eq!(
        reply.header("location"),
        Some(format!("{}/next", instance.url()).as_str())
    );

    let plain = TestGateway::start(&route_to("api", &[instance.url()], ""));
    let reply = location_for(&plain, "/api/redirect", "/x").await;
    assert_eq!(
        reply.header("x-seen-host"),
        Some(instance.address.to_string().as_str()),
        "without preserve_host the instance's own host is sent"
    );
}

// ---------------------------------------------------------------------------
// HTTP/1.0 clients never get chunked framing
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn an_http_1_0_client_gets_a_body_of_unknown_length_close_delimited() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&route_to("api", &[upstream.url()], ""));
    let address = gateway.address;

    for request in [
        "GET /api/chunked/5000 HTTP/1.0\r\nHost: gateway.test\r\n\r\n",
        "GET /api/chunked/5000 HTTP/1.0\r\nHost: gateway.test\r\nConnection: keep-alive\r\n\r\n",
    ] {
        let received = actix_web::rt::task::spawn_blocking(move || {
            raw_exchange_bytes(address, request.as_bytes(), Duration::from_secs(10))
        })
        .await
        .unwrap();
        let split = received
            .windows(4)
            .position(|window| window == b"\r\n\r\n")
            .expect("a response head");
        let head = String::from_utf8_lossy(&received[..split]).to_ascii_lowercase();
        let body = &received[split + 4..];
        assert!(
            head.starts_with("http/1.0 200") || head.starts_with("http/1.1 200"),
            "{head}"
        );
        assert!(!head.contains("transfer-encoding"), "{head}");
        assert!(!head.contains("content-length"), "{head}");
        assert_eq!(body.len(), 5000, "the body, unframed, then the close");
        assert!(body.iter().enumerate().all(|(i, byte)| *byte == pattern_byte(i)));
    }

    // An HTTP/1.1 client still gets the stream chunked, on a kept connection.
    let reply = raw_request(
        &gateway,
        &[
            "GET /api/chunked/10 HTTP/1.1",
            "Host: gateway.test",
            "Connection: close",
        ],
    );
    assert_eq!(reply.header("transfer-encoding"), Some("chunked"));
}

/// Sends raw bytes and returns everything read until the peer closes.
fn raw_exchange_bytes(address: std::net::SocketAddr, request: &[u8], timeout: Duration) -> Vec<u8> {
    use std::io::Read;
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(timeout)).unwrap();
    stream.write_all(request).unwrap();
    let mut received = Vec::new();
    let _ = stream.read_to_end(&mut received);
    received
}

// ---------------------------------------------------------------------------
// A body that pauses: body_idle_timeout_ms, not request_timeout_ms
// ---------------------------------------------------------------------------

/// The head and 10 of 100 promised bytes.
const HEAD_AND_TEN_BYTES: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789";

/// `GET /api/pause` over a raw socket: what arrived until the close.
async fn read_paused_body(gateway: &TestGateway) -> String {
    let address = gateway.address;
    actix_web::rt::task::spawn_blocking(move || {
        raw_exchange(
            address,
            b"GET /api/pause HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n",
            Duration::from_secs(10),
        )
    })
    .await
    .unwrap()
}

#[actix_web::test]
async fn a_body_pause_longer_than_the_head_timeout_passes() {
    let instance = RawInstance::scripted(|_, stream| {
        let _ = stream.write_all(HEAD_AND_TEN_BYTES);
        std::thread::sleep(Duration::from_millis(1200));
        let _ = stream.write_all(&[b'x'; 90]);
    });
    let gateway = TestGateway::start(&format!(
        "[upstream]\nrequest_timeout_ms = 300\nbody_idle_timeout_ms = 5000\n{}",
        route_to("api", &[instance.url()], "")
    ));
    let received = read_paused_body(&gateway).await;
    let body = RawResponse::parse(&received).body;
    assert_eq!(body, format!("0123456789{}", "x".repeat(90)));
}

// ---------------------------------------------------------------------------
// security_headers = false
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn a_route_can_turn_the_security_headers_off() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&format!(
        "{}[routes.images]\nprefix = \"/images\"\nservice = \"api\"\nsecurity_headers = false\nauth = true\n[auth]\njwt_secret = \"{}\"\n",
        route_to("api", &[upstream.url()], ""),
        "s".repeat(32)
    ));

    let plain = get(&gateway.url("/api/x")).await;
    for (name, value) in SECURITY_HEADERS {
        assert_eq!(plain.header(name), Some(value), "{name} on a default route");
    }

    let images = get(&gateway.url("/images/x.png")).await;
    assert_eq!(images.status, 401, "the gateway's own errors on the route too");
    for (name, _) in SECURITY_HEADERS {
        assert_eq!(images.header(name), None, "{name} on a route that turned them off");
    }
    assert!(images.header("x-request-id").is_some());
    assert_eq!(images.header("server"), None);
}
