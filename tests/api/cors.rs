//! CORS per route (SPEC §10), as a browser sees it: preflights answered by
//! the gateway after the address-keyed limits and before auth, never
//! forwarded; the route's CORS headers on every other response, the
//! gateway's own errors included, in place of the upstream's.

use crate::helpers::*;

const SECRET: &str = "gatehouse-cors-test-secret-0123456789abcdefgh";
const APP: &str = "https://app.example.com";

fn settings(upstream: &str, policy_max: u32) -> String {
    format!(
        r#"
[auth]
jwt_secret = "{SECRET}"
[rate_limit]
global = ""
[rate_limit.policies.per-address]
window_s = 60
max = {policy_max}
key = "ip"
message = "Slow down"

[services.api]
instances = ["{upstream}"]

[routes.api]
prefix = "/api"
service = "api"
auth = true
methods = ["GET", "POST"]
rate_limit = "per-address"

[routes.api.cors]
allow_origins = ["{APP}", "http://localhost:3000"]
allow_methods = ["GET", "POST", "PUT"]
allow_headers = ["Authorization", "Content-Type"]
expose_headers = ["X-Request-Id", "RateLimit-Remaining"]
allow_credentials = true
max_age_s = 300

[routes.open]
prefix = "/open"
service = "api"

[routes.open.cors]
allow_origins = ["*"]

[routes.plain]
prefix = "/plain"
service = "api"
"#
    )
}

async fn send(gateway: &TestGateway, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let method = awc::http::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = client().request(method, gateway.url(path));
    for (name, value) in headers {
        request = request.insert_header((*name, *value));
    }
    read_reply(request.send().await.expect("request reaches the gateway")).await
}

async fn preflight(gateway: &TestGateway, path: &str, origin: &str, method: &str, headers: &str) -> Reply {
    let mut asked = vec![("origin", origin), ("access-control-request-method", method)];
    if !headers.is_empty() {
        asked.push(("access-control-request-headers", headers));
    }
    send(gateway, "OPTIONS", path, &asked).await
}

fn cors_headers(reply: &Reply) -> Vec<(String, String)> {
    let mut found: Vec<_> = reply
        .headers
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("access-control-"))
        .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
        .collect();
    found.sort();
    found
}

fn varies_on_origin(reply: &Reply) -> bool {
    reply
        .headers
        .get_all("vary")
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("origin"))
}

#[actix_web::test]
async fn an_allowed_preflight_is_answered_by_the_gateway_without_a_token_and_never_forwarded() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&settings(&upstream.url(), 100));

    // PUT is in the CORS policy though not in the route's `methods`: the
    // route's methods do not apply to preflights.
    let reply = preflight(&gateway, "/api/items/1", APP, "PUT", "content-type, authorization").await;
    assert_eq!(reply.status, 204, "{}", reply.text());
    assert!(reply.body.is_empty());
    assert_eq!(
        cors_headers(&reply),
        [
            ("access-control-allow-credentials".to_owned(), "true".to_owned()),
            (
                "access-control-allow-headers".to_owned(),
                "content-type, authorization".to_owned()
            ),
            ("access-control-allow-methods".to_owned(), "GET, POST, PUT".to_owned()),
            ("access-control-allow-origin".to_owned(), APP.to_owned()),
            ("access-control-max-age".to_owned(), "300".to_owned()),
        ]
    );
    assert!(varies_on_origin(&reply));
    assert!(reply.header("x-request-id").is_some_and(is_uuid));
    assert_eq!(
        reply.header("x-frame-options"),
        Some("SAMEORIGIN"),
        "security headers too"
    );
    assert_eq!(upstream.hits(), 0, "a preflight is never forwarded");

    // `*` without credentials answers any origin with `*`.
    let reply = preflight(&gateway, "/open/x", "https://anyone.example", "GET", "").await;
    assert_eq!(reply.status, 204);
    assert_eq!(reply.header("access-control-allow-origin"), Some("*"));
    assert_eq!(reply.header("access-control-allow-credentials"), None);
    assert_eq!(upstream.hits(), 0);
}

#[actix_web::test]
async fn a_preflight_from_an_origin_method_or_header_not_allowed_gets_204_without_allow_headers() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&settings(&upstream.url(), 100));
    for (origin, method, headers) in [
        ("https://evil.example", "GET", ""),
        ("https://app.example.com.evil.example", "GET", ""),
        (APP, "DELETE", ""),
        (APP, "GET", "x-secret"),
        (APP, "GET", "content-type, x-secret"),
    ] {
        let reply = preflight(&gateway, "/api/items", origin, method, headers).await;
        let case = format!("{origin} {method} [{headers}]");
        assert_eq!(reply.status, 204, "{case}");
        assert_eq!(cors_headers(&reply), [], "{case}");
        assert!(varies_on_origin(&reply), "{case}");
    }
    assert_eq!(upstream.hits(), 0);
}

#[actix_web::test]
async fn routes_without_cors_forward_options_as_any_other_request() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&settings(&upstream.url(), 100));
    let reply = preflight(&gateway, "/plain/x", APP, "GET", "").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(upstream.last_seen().method, "OPTIONS");
    assert_eq!(cors_headers(&reply), []);
    assert!(!varies_on_origin(&reply));
}

#[actix_web::test]
async fn preflights_count_against_the_address_limits_and_their_429_carries_cors_headers() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&settings(&upstream.url(), 2));
    for _ in 0..2 {
        assert_eq!(preflight(&gateway, "/api/x", APP, "GET", "").await.status, 204);
    }
    let reply = preflight(&gateway, "/api/x", APP, "GET", "").await;
    assert_eq!(reply.status, 429, "{}", reply.text());
    assert_eq!(reply.text(), r#"{"error":"Slow down"}"#);
    assert_eq!(reply.header("access-control-allow-origin"), Some(APP));
    assert_eq!(reply.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(
        reply.header("access-control-expose-headers"),
        Some("X-Request-Id, RateLimit-Remaining")
    );
    assert!(varies_on_origin(&reply));
    assert_eq!(upstream.hits(), 0);
}

#[actix_web::test]
async fn the_gateway_s_own_401_and_403_carry_the_route_s_cors_headers_for_an_allowed_origin() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::start(&settings(&upstream.url(), 100));

    let reply = send(&gateway, "GET", "/api/me", &[("origin", APP)]).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.text(), r#"{"error":"Access token required"}"#);
    assert_eq!(reply.header("access-control-allow-origin"), Some(APP));
    assert_eq!(reply.header("access-control-allow-credentials"), Some("true"));
    assert!(varies_on_origin(&reply));

    let reply = send(
        &gateway,
        "GET",
        "/api/me",
        &[
            ("origin", "http://localhost:3000"),
            ("authorization", "Bearer not.a.token"),
        ],
    )
    .await;
    assert_eq!(reply.status, 403);
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("http://localhost:3000")
    );

    // An origin that is not allowed gets none (the browser hides the answer).
    let reply = send(&gateway, "GET", "/api/me", &[("origin", "https://evil.example")]).await;
    assert_eq!(reply.status, 401);
    assert_eq!(cors_headers(&reply), []);
    assert_eq!(upstream.hits(), 0);
}

#[actix_web::test]
async fn proxied_responses_get_the_route_s_cors_headers_in_place_of_the_upstream_s() {
    let upstream = RawInstance::scripted(|_head, stream| {
        use std::io::Write;
        let _ = stream.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nAccess-Control-Allow-Origin: *\r\n\
              Access-Control-Allow-Methods: DELETE\r\nVary: Accept-Encoding\r\n\r\nok",
        );
    });
    let gateway = TestGateway::start(&settings(&upstream.url(), 100));
    let bearer = format!("Bearer {}", hs256_token(SECRET, "ada"));

    let reply = send(
        &gateway,
        "GET",
        "/api/data",
        &[("origin", APP), ("authorization", &bearer)],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "ok");
    assert_eq!(
        cors_headers(&reply),
        [
            ("access-control-allow-credentials".to_owned(), "true".to_owned()),
            ("access-control-allow-origin".to_owned(), APP.to_owned()),
            (
                "access-control-expose-headers".to_owned(),
                "X-Request-Id, RateLimit-Remaining".to_owned()
            ),
        ]
    );
    let vary: Vec<_> = reply.headers.get_all("vary").map(|v| v.to_str().unwrap()).collect();
    assert_eq!(
        vary,
        ["Accept-Encoding", "Origin"],
        "the upstream's Vary is kept, Origin added"
    );

    // A request from another origin gets none, not even the upstream's.
    let reply = send(
        &gateway,
        "GET",
        "/api/data",
        &[("origin", "https://evil.example"), ("authorization", &bearer)],
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(cors_headers(&reply), []);

    // A same-origin request (no Origin) gets none either.
    let reply = send(&gateway, "GET", "/api/data", &[("authorization", &bearer)]).await;
    assert_eq!(cors_headers(&reply), []);
    assert!(upstream.requests() >= 3);
}

#[actix_web::test]
async fn a_wildcard_origin_with_credentials_and_malformed_entries_are_refused_at_validation() {
    let base =
        "[services.api]\ninstances = [\"http://127.0.0.1:9\"]\n[routes.api]\nprefix = \"/api\"\nservice = \"api\"\n";
    let found = problems(&format!(
        "{base}[routes.api.cors]\nallow_origins = [\"*\"]\nallow_credentials = true\n"
    ));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("routes.api.cors.allow_credentials: cannot be true with allow_origins = [\"*\"]"),
        "{found:?}"
    );
    let found = problems(&format!(
        "{base}[routes.api.cors]\nallow_origins = [\"app.example.com\"]\nallow_methods = [\"G T\"]\nallow_headers = [\"bad header\"]\n"
    ));
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(found
        .iter()
        .any(|p| p.starts_with("routes.api.cors.allow_origins: \"app.example.com\"")));
    assert!(found
        .iter()
        .any(|p| p.starts_with("routes.api.cors.allow_methods: \"G T\"")));
    assert!(found
        .iter()
        .any(|p| p.starts_with("routes.api.cors.allow_headers: \"bad header\"")));
    let found = problems(&format!("{base}[routes.api.cors]\nallow_originz = [\"*\"]\n"));
    assert!(found.iter().any(|p| p.contains("allow_originz")), "{found:?}");
}
