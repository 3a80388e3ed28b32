//! Requests a client may send that the gateway must refuse or reshape before
//! they reach an instance (SPEC §3 steps 2–3 and 7, the error list): framing
//! headers spelled with underscores, hosts that are not hosts, `TRACE` and
//! `CONNECT`, over-long request lines, and encoded slashes.

use std::time::Duration;

use crate::helpers::*;

/// One service `api` behind `/api`, with extra route keys.
fn api(upstream: &Upstream, route_keys: &str) -> String {
    format!(
        "[services.api]\ninstances = {}\n[routes.api]\nprefix = \"/api\"\nservice = \"api\"\n{route_keys}\n",
        instances(&[upstream])
    )
}

fn assert_bad_request(reply: &RawResponse, what: &str) {
    assert_eq!(reply.status, 400, "{what}: {}", reply.body);
    assert_eq!(reply.header("content-type"), Some("application/json"), "{what}");
    assert_eq!(reply.body, r#"{"error":"Bad request"}"#, "{what}");
}

// ---------------------------------------------------------------------------
// Step 7: underscore spellings of framing and hop-by-hop headers
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn underscore_spellings_of_hop_by_hop_headers_are_not_forwarded() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&api(&upstream, ""));

    let request = [
        "POST /api/underscores HTTP/1.1",
        "Host: gateway.test",
        "Content-Length: 5",
        "Transfer_Encoding: chunked",
        "Content_Length: 99",
        "Keep_Alive: timeout=5",
        "Proxy_Connection: keep-alive",
        "Proxy_Authorization: Basic Zm9vOmJhcg==",
        "X_Kept_Header: yes",
        "Connection: close",
        "",
        "hello",
    ]
    .join("\r\n");
    let reply = RawResponse::parse(&raw_exchange(
        gateway.address,
        request.as_bytes(),
        Duration::from_secs(10),
    ));
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen = upstream.last_seen();
    for name in [
        "transfer_encoding",
        "content_length",
        "keep_alive",
        "proxy_connection",
        "proxy_authorization",
        "transfer-encoding",
    ] {
        assert_eq!(seen.header(name), None, "{name} reached the upstream");
    }
    assert_eq!(seen.header("x_kept_header"), Some("yes"), "other underscores pass");
    assert_eq!(seen.header("content-length"), Some("5"));
    assert_eq!(seen.body_len, 5);
}

// ---------------------------------------------------------------------------
// Step 2: the host must be a host
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn a_host_that_is_not_host_and_port_is_a_400() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&api(&upstream, ""));

    for host in ["a b", "evil.example/../x", "127.0.0.1@evil.example", "", "host:port"] {
        let reply = raw_request(
            &gateway,
            &["GET /api/x HTTP/1.1", &format!("Host: {host}"), "Connection: close"],
        );
        assert_bad_request(&reply, &format!("Host {host:?}"));
    }
    let reply = raw_request(&gateway, &["GET /api/x HTTP/1.1", "Connection: close"]);
    assert_eq!(reply.status, 400, "HTTP/1.1 without Host (the parser's own, bare 400)");
    assert_eq!(upstream.hits(), 0, "no refused request was forwarded");

    let reply = raw_request(&gateway, &["GET /api/x HTTP/1.0"]);
    assert_eq!(reply.status, 200, "HTTP/1.0 needs no Host: {}", reply.body);
    let reply = raw_request(
        &gateway,
        &["GET /api/x HTTP/1.1", "Host: [::1]:8080", "Connection: close"],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(upstream.last_seen().header("x-forwarded-host"), Some("[::1]:8080"));
}

#[actix_web::test]
async fn an_absolute_form_targets_authority_is_the_forwarded_host() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&api(&upstream, ""));

    let reply = raw_request(
        &gateway,
        &[
            "GET http://target.example:81/api/x?q=1 HTTP/1.1",
            "Host: other.example",
            "Connection: close",
        ],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen = upstream.last_seen();
    assert_eq!(seen.header("x-forwarded-host"), Some("target.example:81"));
    assert_eq!(seen.target, "/api/x?q=1");
    assert_eq!(seen.header("host"), Some(upstream.address.to_string().as_str()));

    let reply = raw_request(
        &gateway,
        &[
            "GET http://me@target.example/api/x HTTP/1.1",
            "Host: target.example",
            "Connection: close",
        ],
    );
    assert_eq!(reply.status, 400, "user info in an absolute target: {}", reply.body);
}

// ---------------------------------------------------------------------------
// Step 3: TRACE and CONNECT only where a route lists them
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn trace_and_connect_are_405_unless_the_route_lists_them() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&format!(
        "{}[routes.debug]\nprefix = \"/debug\"\nservice = \"api\"\nmethods = [\"GET\", \"TRACE\"]\n",
        api(&upstream, "")
    ));

    for request_line in [
        "TRACE /api/x HTTP/1.1",
        "CONNECT /api/x HTTP/1.1",
        "CONNECT upstream.example:443 HTTP/1.1",
    ] {
        let reply = raw_request(&gateway, &[request_line, "Host: gateway.test", "Connection: close"]);
        assert_eq!(reply.status, 405, "{request_line}: {}", reply.body);
        assert_eq!(reply.body, r#"{"error":"Method not allowed"}"#, "{request_line}");
        assert_eq!(
            reply.header("allow"),
            Some("DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"),
            "{request_line}"
        );
    }
    assert_eq!(upstream.hits(), 0);

    let reply = raw_request(
        &gateway,
        &["TRACE /debug/x HTTP/1.1", "Host: gateway.test", "Connection: close"],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(upstream.last_seen().method, "TRACE");
}

// ---------------------------------------------------------------------------
// The error list: 414 for the request line, 431 for the head
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn a_request_line_longer_than_max_header_bytes_is_414_and_a_long_head_431() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&api(&upstream, ""));
    let address = gateway.address;

    let long_target = format!("/api/{}", "a".repeat(40 * 1024));
    let reply = actix_web::rt::task::spawn_blocking(move || {
        RawResponse::parse(&raw_exchange(
            address,
            format!("GET {long_target} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(10),
        ))
    })
    .await
    .unwrap();
    assert_eq!(reply.status, 414, "{}", reply.body);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.body, r#"{"error":"URI too long"}"#);

    let target = format!("/api/{}", "a".repeat(20 * 1024));
    let header = format!("X-Big: {}", "b".repeat(20 * 1024));
    let reply = actix_web::rt::task::spawn_blocking(move || {
        RawResponse::parse(&raw_exchange(
            address,
            format!("GET {target} HTTP/1.1\r\nHost: gateway.test\r\n{header}\r\nConnection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(10),
        ))
    })
    .await
    .unwrap();
    assert_eq!(reply.status, 431, "{}", reply.body);
    assert_eq!(reply.body, r#"{"error":"Request header fields too large"}"#);
    assert_eq!(upstream.hits(), 0);
}

// ---------------------------------------------------------------------------
// Step 2: allow_encoded_slash
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn a_route_with_allow_encoded_slash_forwards_percent_2f_as_sent() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&format!(
        "{}[routes.packages]\nprefix = \"/packages\"\nservice = \"api\"\nallow_encoded_slash = true\nstrip_prefix = true\n",
        api(&upstream, "")
    ));

    let reply = get(&gateway.url("/packages/@scope%2Fname/..%2F/v1?x=%2F")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        upstream.last_seen().target,
        "/@scope%2Fname/..%2F/v1?x=%2F",
        "%2F kept encoded, never a separator"
    );

    let reply = get(&gateway.url("/packages/a%2F/../b")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(upstream.last_seen().target, "/b");

    let hits = upstream.hits();
    for path in ["/api/users%2F7", "/nowhere%2Fx", "/packages/a%5Cb"] {
        let reply = get(&gateway.url(path)).await;
        assert_eq!(reply.status, 400, "{path}: {}", reply.text());
        assert_eq!(reply.json(), serde_json::json!({"error": "Bad request"}), "{path}");
    }
    assert_eq!(upstream.hits(), hits, "refused paths were not forwarded");
}
