//! Hardening (SPEC §2–§5): what a client, an upstream, Redis and `/health`
//! show of the edge cases behind the latest fixes — a client that stalls its
//! own upload, a retry that must stay inside `request_timeout_ms`, one slow
//! instance next to another, invented methods in `/metrics`, headers
//! smuggled with underscores, an explicit `Content-Length: 0`, the gateway's
//! Redis connections and round trips, `Retry-After` with several exhausted
//! policies, and `rediss://` in the config.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::helpers::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// What a client that stalled its upload saw.
#[derive(Debug)]
enum StalledOutcome {
    /// A whole response (head and the body its `Content-Length` declares).
    Answered(String),
    /// The gateway closed or reset the connection without a response.
    Closed,
    /// Nothing within the limit.
    Nothing,
}

/// Reads one response from `stream`: returns once the head and the declared
/// body are in, or the peer closes, or `limit` passes.
fn read_one_response(stream: &mut TcpStream, limit: Duration) -> StalledOutcome {
    let deadline = Instant::now() + limit;
    let mut received = Vec::new();
    let mut buffer = [0u8; 8192];
    loop {
        if let Some(end) = received.windows(4).position(|window| window == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .and_then(|value| value.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if received.len() >= end + 4 + length {
                return StalledOutcome::Answered(String::from_utf8_lossy(&received).into_owned());
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return StalledOutcome::Nothing;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return StalledOutcome::Nothing
            }
            Err(_) => break,
        }
    }
    if received.is_empty() {
        StalledOutcome::Closed
    } else {
        StalledOutcome::Answered(String::from_utf8_lossy(&received).into_owned())
    }
}

/// A one-worker gateway with the service `api` on `upstream` behind `/api`.
fn api_gateway(upstream: &Upstream) -> TestGateway {
    TestGateway::builder()
        .workers(1)
        .start(&service_at("api", "/api", &[upstream.url()]))
}

// ---------------------------------------------------------------------------
// 1. A stalled upload is the client's fault, not the instance's
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn a_client_that_stalls_its_upload_gets_504_and_does_not_make_the_instance_unhealthy() {
    let upstream = Upstream::start("api");
    let gateway = TestGateway::builder().workers(1).start(&format!(
        "[upstream]\nrequest_timeout_ms = 500\n\
         [health]\ninterval_ms = 60000\ntimeout_ms = 500\npassive_failures = 1\n{}",
        service_at("api", "/api", &[upstream.url()]),
    ));

    for round in 1..=3 {
        let mut stream = TcpStream::connect(gateway.address).unwrap();
        stream
            .write_all(
                b"POST /api/upload HTTP/1.1\r\nHost: gateway.test\r\n\
                  Content-Type: application/octet-stream\r\nContent-Length: 100\r\n\r\n0123456789",
            )
            .unwrap();
        let started = Instant::now();
        let outcome = read_one_response(&mut stream, Duration::from_secs(5));
        let took = started.elapsed();
        match &outcome {
            StalledOutcome::Answered(response) => {
                let reply = RawResponse::parse(response);
                assert_eq!(reply.status, 504, "round {round}: {response:?}");
                assert_eq!(reply.body, r#"{"error":"Gateway timeout","service":"api"}"#);
            }
            StalledOutcome::Closed => {}
            StalledOutcome::Nothing => panic!("round {round}: neither an answer nor a close within 5 s"),
        }
        assert!(
            took < Duration::from_secs(3),
            "round {round}: the stalled upload was ended after {took:?}"
        );
        drop(stream);

        // Give a (wrong) passive report time to reach the registry.
        actix_web::rt::time::sleep(Duration::from_millis(150)).await;
        let report = health(&gateway).await;
        let entry = instance(&report, "api", &upstream.url());
        assert_eq!(
            entry["healthy"], true,
            "round {round}: a stalled upload marked the instance unhealthy: {entry}"
        );
        assert_eq!(report["status"], "ok", "round {round}: {report}");

        let before = upstream.hits();
        let reply = get(&gateway.url("/api/after-the-stall")).await;
        assert_eq!(reply.status, 200, "round {round}: {}", reply.text());
        assert_eq!(reply.header("x-upstream-instance"), Some("api"));
        assert_eq!(
            upstream.hits(),
            before + 1,
            "round {round}: the GET reached the instance"
        );
    }
}

// ---------------------------------------------------------------------------
// 2. The retry only gets what is left of request_timeout_ms
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn a_retry_after_a_late_reset_stays_inside_the_request_timeout() {
    // a: reads the request, waits 1 s and closes without answering.
    // b: reads the request and never answers.
    // Both pass their probes: one failed at start-up would take it out.
    let a = RawInstance::start_passing_probes(Behaviour::CloseAfter(Duration::from_millis(1000)));
    let b = RawInstance::start_passing_probes(Behaviour::Hold);
    let gateway = TestGateway::builder().workers(1).start(&format!(
        "[upstream]\nrequest_timeout_ms = 1500\n\
         [health]\ninterval_ms = 60000\ntimeout_ms = 2000\nunhealthy_threshold = 10\npassive_failures = 1000\n{}",
        service_at("pair", "/api/pair", &[a.url(), b.url()]),
    ));

    // Round robin: one of two consecutive requests tries a first (reset at
    // 1 s, then b with the 0.5 s left), the other tries b first (timeout, no
    // retry). Either way the answer is a 504 at the request timeout.
    for request in 1..=2 {
        let started = Instant::now();
        let reply = get(&gateway.url("/api/pair/item")).await;
        let took = started.elapsed();
        assert_eq!(reply.status, 504, "request {request}: {}", reply.text());
        assert_eq!(reply.text(), r#"{"error":"Gateway timeout","service":"pair"}"#);
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert!(
            took >= Duration::from_millis(1400),
            "request {request}: 504 before the request timeout, after {took:?}"
        );
        assert!(
            took < Duration::from_millis(2200),
            "request {request}: 504 after {took:?}; the retry must get only what is left of 1500 ms"
        );
    }
    assert!(
        a.requests() >= 1,
        "a was tried first for one of the requests: {} tries",
        a.requests()
    );
    let both_reached_b = eventually(Duration::from_secs(2), async || b.requests() == 2).await;
    assert!(
        both_reached_b,
        "each request ended at b, first or as the retry after a's reset: {} at b",
        b.requests()
    );
}

// ---------------------------------------------------------------------------
// 3. max_connections_per_host caps each host, not the gateway
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn slow_requests_holding_one_hosts_connections_do_not_delay_another_host() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let gateway = TestGateway::builder().workers(1).start(&format!(
        "[upstream]\nmax_connections_per_host = 2\n[health]\ninterval_ms = 60000\n{}{}",
        service_at("a", "/a", &[a.url()]),
        service_at("b", "/b", &[b.url()]),
    ));

    let slow: Vec<_> = (0..2)
        .map(|_| {
            let url = gateway.url("/a/slow/3000");
            actix_web::rt::spawn(async move {
                let reply = get(&url).await;
                (reply.status, reply.header("x-upstream-instance").map(str::to_owned))
            })
        })
        .collect();
    let both_in_flight = eventually(Duration::from_secs(2), async || a.hits() == 2).await;
    assert!(both_in_flight, "both slow requests reached a: {} hits", a.hits());

    let started = Instant::now();
    let reply = get(&gateway.url("/b/quick")).await;
    let took = started.elapsed();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-upstream-instance"), Some("b"));
    assert!(
        took < Duration::from_millis(1000),
        "b answered after {took:?}: it waited for a's connections"
    );

    for handle in slow {
        assert_eq!(handle.await.unwrap(), (200, Some("a".to_owned())));
    }
}

// ---------------------------------------------------------------------------
// 4. Metrics: invented methods are one OTHER series
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn an_invented_method_is_counted_as_other_in_the_metrics() {
    let upstream = Upstream::start("inventive");
    let gateway =
        TestGateway::builder()
            .workers(1)
            .start(&service_at("invented-methods", "/invented", &[upstream.url()]));
    let reply = raw_request(
        &gateway,
        &["FOO /invented/x HTTP/1.1", "Host: gateway.test", "Connection: close"],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(upstream.last_seen().method, "FOO", "the method is forwarded as sent");

    let metrics = get(&gateway.url("/metrics")).await;
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    let series: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("gatehouse_requests_total{") && line.contains(r#"route="invented-methods""#))
        .collect();
    let other = series
        .iter()
        .find(|line| line.contains(r#"method="OTHER""#) && line.contains(r#"status="200""#))
        .unwrap_or_else(|| panic!("no method=\"OTHER\" series for the route: {series:#?}"));
    assert_eq!(other.rsplit_once(' ').map(|(_, value)| value), Some("1"), "{other}");
    let invented: Vec<&str> = text.lines().filter(|line| line.contains(r#"method="FOO""#)).collect();
    assert!(invented.is_empty(), "a series per invented method: {invented:#?}");
}

// ---------------------------------------------------------------------------
// 5. Underscores cannot smuggle the gateway's own headers
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn underscore_spellings_of_the_gateways_own_headers_never_reach_the_upstream() {
    let upstream = Upstream::start("api");
    let gateway = api_gateway(&upstream);

    let reply = raw_request(
        &gateway,
        &[
            "GET /api/public HTTP/1.1",
            "Host: gateway.test",
            "Connection: close",
            "X_User_Id: admin",
            "X_User_Roles: admin",
            "X_Forwarded_For: 1.2.3.4",
            "X_Request_Id: x",
            "My_Header: 1",
        ],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let request_id = reply.header("x-request-id").expect("x-request-id on the response");
    assert!(is_uuid(request_id), "the gateway's own request id: {request_id:?}");

    let seen = upstream.last_seen();
    for (name, values) in &seen.headers {
        let dashed = name.replace('_', "-");
        match dashed.as_str() {
            "x-user-id" | "x-user-roles" => {
                panic!("{name}: {values:?} reached the upstream on a public route")
            }
            "x-forwarded-for" => assert_eq!(
                (name.as_str(), values.as_slice()),
                ("x-forwarded-for", &["127.0.0.1".to_owned()][..]),
                "only the gateway's X-Forwarded-For"
            ),
            "x-request-id" => assert_eq!(
                (name.as_str(), values.as_slice()),
                ("x-request-id", &[request_id.to_owned()][..]),
                "only the gateway's X-Request-Id"
            ),
            _ => {}
        }
    }
    assert_eq!(values(&seen, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(values(&seen, "x-request-id"), [request_id]);
    assert_eq!(
        values(&seen, "my_header"),
        ["1"],
        "an unrelated underscore header passes"
    );
}

#[actix_web::test]
async fn x_forwarded_port_and_prefix_from_an_untrusted_peer_are_dropped() {
    let upstream = Upstream::start("api");
    let gateway = api_gateway(&upstream);

    let reply = raw_request(
        &gateway,
        &[
            "GET /api/where HTTP/1.1",
            "Host: gateway.test",
            "Connection: close",
            "X-Forwarded-Port: 8443",
            "X-Forwarded-Prefix: /evil",
            "X_Forwarded_Prefix: /evil",
        ],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen = upstream.last_seen();
    for name in ["x-forwarded-port", "x-forwarded-prefix", "x_forwarded_prefix"] {
        assert_eq!(seen.header(name), None, "{name} from an untrusted peer was forwarded");
    }
    assert_eq!(values(&seen, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(values(&seen, "x-forwarded-proto"), ["http"]);
    assert_eq!(values(&seen, "x-forwarded-host"), ["gateway.test"]);
}

// ---------------------------------------------------------------------------
// 6. An explicit Content-Length: 0 is kept; none is invented
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn an_explicit_content_length_zero_is_forwarded_and_a_body_less_get_gets_none() {
    let upstream = Upstream::start("api");
    let gateway = api_gateway(&upstream);

    let reply = raw_request(
        &gateway,
        &[
            "POST /api/empty HTTP/1.1",
            "Host: gateway.test",
            "Connection: close",
            "Content-Length: 0",
        ],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen = upstream.last_seen();
    assert_eq!((seen.method.as_str(), seen.body_len), ("POST", 0));
    assert_eq!(values(&seen, "content-length"), ["0"]);
    assert_eq!(seen.header("transfer-encoding"), None);

    let reply = raw_request(
        &gateway,
        &["GET /api/nothing HTTP/1.1", "Host: gateway.test", "Connection: close"],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen = upstream.last_seen();
    assert_eq!((seen.method.as_str(), seen.body_len), ("GET", 0));
    assert_eq!(seen.header("content-length"), None, "no length invented for a GET");
    assert_eq!(seen.header("transfer-encoding"), None);
}

// ---------------------------------------------------------------------------
// 7. One Redis connection per worker, one round trip per request
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn sequential_requests_share_one_redis_connection_and_cost_one_script_call_each() {
    const REQUESTS: u64 = 200;
    let redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let connections_before = redis.connections_received();
    let gateway = TestGateway::builder().workers(1).start(&format!(
        r#"
[rate_limit]
backend = "redis"
redis_url = "{url}"
key_prefix = "hardening-connections"
global = ""
[rate_limit.policies.roomy]
window_s = 60
max = 100000

[services.app]
instances = {instances}
[routes.app]
prefix = "/app"
service = "app"
rate_limit = "roomy"
"#,
        url = redis.url(),
        instances = instances(&[&upstream]),
    ));

    let client = client();
    for n in 0..REQUESTS {
        let response = client.get(gateway.url("/app/x")).send().await.unwrap();
        let reply = read_reply(response).await;
        assert_eq!(reply.status, 200, "request {n}: {}", reply.text());
        assert!(reply.header("ratelimit-remaining").is_some(), "request {n} was counted");
    }

    // Less this call's own connection.
    let by_the_gateway = redis.connections_received() - connections_before - 1;
    assert!(
        by_the_gateway <= 4,
        "{REQUESTS} requests on one worker opened {by_the_gateway} Redis connections"
    );
    let scripts = redis.calls("evalsha");
    assert!(
        (REQUESTS..=REQUESTS + 2).contains(&scripts),
        "one EVALSHA per request: {scripts} for {REQUESTS} requests"
    );
    let pings = redis.calls("ping");
    assert!(
        pings <= 10,
        "{pings} PINGs for {REQUESTS} requests: a connection check per request"
    );
}

// ---------------------------------------------------------------------------
// 8. Retry-After waits for every exhausted policy
// ---------------------------------------------------------------------------

/// One worker; global policy 2 per 60 s; route `/r` adds 1 per 5 s;
/// `/other` has only the global one.
fn two_policies(rate_limit: &str, upstream: &Upstream) -> TestGateway {
    TestGateway::builder().workers(1).start(&format!(
        r#"
[rate_limit]
{rate_limit}
global = "everything"
[rate_limit.policies.everything]
window_s = 60
max = 2
message = "Too many requests from this IP"
[rate_limit.policies.tight]
window_s = 5
max = 1
message = "Too many r requests"

[services.app]
instances = {instances}
[routes.r]
prefix = "/r"
service = "app"
rate_limit = "tight"
[routes.other]
prefix = "/other"
service = "app"
"#,
        instances = instances(&[upstream]),
    ))
}

/// /other (global 1 of 2), /r (global 2 of 2, route 1 of 1), /r again:
/// refused with both exhausted; the route's frees in 5 s, the global's in
/// 60 s, and only then is the request admitted.
async fn retry_after_covers_the_longest_exhausted_policy(gateway: &TestGateway) {
    let reply = get(&gateway.url("/other")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = get(&gateway.url("/r")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    let refused = get(&gateway.url("/r")).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.header("content-type"), Some("application/json"));
    let message = refused.json()["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        ["Too many requests from this IP", "Too many r requests"].contains(&message.as_str()),
        "the message of a refusing policy: {message:?}"
    );
    assert_eq!(refused.header("ratelimit-remaining"), Some("0"));
    let retry_after: u64 = refused
        .header("retry-after")
        .expect("Retry-After on a 429")
        .parse()
        .expect("Retry-After in seconds");
    assert!(
        (55..=60).contains(&retry_after),
        "Retry-After {retry_after}: the global policy frees a slot only in ~60 s, the route's in ~5 s"
    );
}

#[actix_web::test]
async fn memory_retry_after_waits_for_every_exhausted_policy() {
    let upstream = Upstream::start("app");
    let gateway = two_policies("backend = \"memory\"", &upstream);
    retry_after_covers_the_longest_exhausted_policy(&gateway).await;
}

#[actix_web::test]
async fn redis_retry_after_waits_for_every_exhausted_policy() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let gateway = two_policies(
        &format!(
            "backend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"hardening-retry-after\"",
            redis.url()
        ),
        &upstream,
    );
    retry_after_covers_the_longest_exhausted_policy(&gateway).await;
}

// ---------------------------------------------------------------------------
// 9. rediss:// is a valid Redis URL; other schemes are refused at validation
// ---------------------------------------------------------------------------

#[test]
fn check_config_accepts_a_rediss_url_and_refuses_another_scheme_naming_rate_limit_redis_url() {
    let dir = settings_dir(&format!(
        "[server]\nlisten = \"127.0.0.1:{}\"\nworkers = 1\n\
         [rate_limit]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:6380\"\n\
         [services.user]\ninstances = [\"http://127.0.0.1:3001\"]\n\
         [routes.users]\nprefix = \"/api/users\"\nservice = \"user\"\n",
        free_port()
    ));

    let run = run_gatehouse(
        dir.path(),
        Some("test"),
        &[("GATEHOUSE__RATE_LIMIT__REDIS_URL", "rediss://127.0.0.1:6380")],
        &["check-config"],
    );
    assert_eq!(run.code, Some(0), "rediss:// (TLS) is valid: {}", run.stderr);

    let Finished { code, stdout, stderr } = run_gatehouse(
        dir.path(),
        Some("test"),
        &[("GATEHOUSE__RATE_LIMIT__REDIS_URL", "https://127.0.0.1:6380")],
        &["check-config"],
    );
    assert_eq!(code, Some(1), "https:// accepted; stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stderr.contains("rate_limit.redis_url"),
        "the message names the key: {stderr}"
    );
    assert!(stdout.trim().is_empty(), "nothing on stdout when refused: {stdout}");
}

// ---------------------------------------------------------------------------
// 10. A keep-alive connection stalled in a later request head is closed
// ---------------------------------------------------------------------------

/// Reads one response with a `Content-Length` body off a kept-alive stream.
fn read_one_kept_alive_response(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let n = stream.read(&mut buffer).expect("the first response arrives");
        assert!(n > 0, "the gateway closed the connection early");
        received.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&received).into_owned();
        if let Some(head_end) = text.find("\r\n\r\n") {
            let length: usize = text[..head_end]
                .lines()
                .find_map(|line| {
                    line.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .and_then(|value| value.parse().ok())
                .unwrap_or(0);
            if received.len() >= head_end + 4 + length {
                return text;
            }
        }
    }
}

/// One worker (so both requests share its connection watch) and a short
/// head timeout, in front of `upstream` at `/api`.
fn one_worker_with_300_ms_head_timeout(upstream: &Upstream) -> TestGateway {
    TestGateway::builder()
        .workers(1)
        .server("client_request_timeout_ms = 300")
        .start(&service_at("api", "/api", &[upstream.url()]))
}

#[actix_web::test]
async fn a_keep_alive_connection_stalled_in_its_second_request_head_is_closed() {
    let upstream = Upstream::start("keep-alive");
    let gateway = one_worker_with_300_ms_head_timeout(&upstream);
    let address = gateway.address;
    let closed_after = actix_web::rt::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(address).unwrap();
        stream
            .write_all(b"GET /api/first HTTP/1.1\r\nHost: gatehouse.test\r\n\r\n")
            .unwrap();
        let first = read_one_kept_alive_response(&mut stream);
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        stream.write_all(b"GET /api/second HTTP/1.1\r\nHost: gate").unwrap();
        let started = Instant::now();
        let (_, closed) = read_until_close(&mut stream, Duration::from_secs(12));
        closed.then(|| started.elapsed())
    })
    .await
    .unwrap();
    let closed_after = closed_after.expect("the stalled connection was never closed");
    assert!(closed_after < Duration::from_secs(9), "closed after {closed_after:?}");
    assert_eq!(upstream.hits(), 1, "the half-sent request never reached the upstream");
}

#[actix_web::test]
async fn a_slow_response_on_a_kept_alive_connection_is_not_cut() {
    let upstream = Upstream::start("slow-keep-alive");
    let gateway = one_worker_with_300_ms_head_timeout(&upstream);
    let address = gateway.address;
    let second = actix_web::rt::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        stream
            .write_all(b"GET /api/first HTTP/1.1\r\nHost: gatehouse.test\r\n\r\n")
            .unwrap();
        read_one_kept_alive_response(&mut stream);
        // Longer than the idle limit (5 s keep-alive + head timeout), but in flight.
        stream
            .write_all(b"GET /api/slow/7000 HTTP/1.1\r\nHost: gatehouse.test\r\n\r\n")
            .unwrap();
        read_one_kept_alive_response(&mut stream)
    })
    .await
    .unwrap();
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
}

// ---------------------------------------------------------------------------
// 11. A stalled upstream body does not hold the client forever (its pauses
//     are bounded by upstream.body_idle_timeout_ms)
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn an_upstream_body_that_stalls_is_cut_after_the_body_idle_timeout() {
    // An upstream that sends its head and 10 of 100 promised bytes, then waits.
    let upstream = RawInstance::start(Behaviour::AnswerThenHold(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
    ));
    let gateway = TestGateway::builder().workers(1).start(&format!(
        "[upstream]\nbody_idle_timeout_ms = 500\n{}",
        service_at("api", "/api", &[upstream.url()])
    ));
    let address = gateway.address;
    let (received, elapsed) = actix_web::rt::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(address).unwrap();
        stream
            .write_all(b"GET /api/stalls HTTP/1.1\r\nHost: gatehouse.test\r\n\r\n")
            .unwrap();
        let started = Instant::now();
        let (received, _) = read_until_close(&mut stream, Duration::from_secs(10));
        (received, started.elapsed())
    })
    .await
    .unwrap();
    assert!(
        received.starts_with("HTTP/1.1 200"),
        "the head and the first bytes pass: {received:?}"
    );
    assert!(received.ends_with("0123456789"), "{received:?}");
    assert!(
        elapsed < Duration::from_secs(3),
        "the stalled body was cut after {elapsed:?}"
    );
}

/// Reads until the peer closes or `limit` passes: what arrived, and whether
/// the peer closed.
fn read_until_close(stream: &mut TcpStream, limit: Duration) -> (String, bool) {
    let started = Instant::now();
    stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let mut closed = false;
    while started.elapsed() < limit {
        match stream.read(&mut buffer) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    (String::from_utf8_lossy(&received).into_owned(), closed)
}
