//! Rate limits (SPEC §3 steps 4–5, §4), as a client and an operator see
//! them: the sliding log in a real `redis-server` shared by gateways, the
//! in-process log, the `RateLimit-*` headers, the keys in Redis, and what
//! happens while Redis is down, frozen, restarted or flushed.
//!
//! Every test starts its own `redis-server` on a free loopback port (so it can
//! kill and restart it) and uses its own `key_prefix`, so no two tests ever
//! share a key.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::*;

/// 46 bytes, comfortably above the 32-byte minimum.
const SECRET: &str = "gatehouse-rate-limit-test-secret-0123456789abc";
const BACKEND_UNAVAILABLE: &str = r#"{"error":"Rate limit backend unavailable"}"#;

// ---------------------------------------------------------------------------
// Configuration, requests, headers
// ---------------------------------------------------------------------------

/// The `[rate_limit]` keys for the Redis backend.
fn on_redis(redis: &RedisServer, key_prefix: &str) -> String {
    format!(
        "backend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"{key_prefix}\"\n",
        redis.url()
    )
}

/// The Redis key of SPEC §4.
fn key(prefix: &str, client: &str, policy: &str) -> String {
    format!("{prefix}:{{{client}}}:{policy}")
}

/// One service, `app`, on `upstream`.
fn app(upstream: &Upstream) -> String {
    format!("[services.app]\ninstances = {}\n", instances(&[upstream]))
}

/// An HS256 token for `sub`, valid for an hour.
fn token(sub: &str) -> String {
    hs256_token(SECRET, sub)
}

async fn get_with(url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = client().get(url).no_decompress();
    for &(name, value) in headers {
        request = request.insert_header((name, value));
    }
    read_reply(request.send().await.expect("request reaches the gateway")).await
}

async fn get_as(url: &str, user: &str) -> Reply {
    get_with(url, &[("authorization", &format!("Bearer {}", token(user)))]).await
}

/// `GET url` and how long the answer took.
async fn timed_get(url: &str) -> (Reply, Duration) {
    let started = Instant::now();
    let reply = get(url).await;
    (reply, started.elapsed())
}

fn number(reply: &Reply, name: &str) -> u64 {
    reply
        .header(name)
        .unwrap_or_else(|| panic!("no {name} header (status {})", reply.status))
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a number: {:?}", reply.header(name)))
}

/// The `RateLimit-*` headers of SPEC §4 for a policy of `max` per `window_s`.
fn assert_limit_headers(reply: &Reply, max: u64, window_s: u64, remaining: u64) {
    assert_eq!(
        reply.header("ratelimit-policy"),
        Some(format!("{max};w={window_s}").as_str()),
        "RateLimit-Policy (status {})",
        reply.status
    );
    assert_eq!(number(reply, "ratelimit-limit"), max, "RateLimit-Limit");
    assert_eq!(number(reply, "ratelimit-remaining"), remaining, "RateLimit-Remaining");
    let reset = number(reply, "ratelimit-reset");
    assert!(
        (1..=window_s).contains(&reset),
        "RateLimit-Reset {reset} not in 1..={window_s}"
    );
}

fn assert_no_limit_headers(reply: &Reply) {
    for name in [
        "ratelimit-policy",
        "ratelimit-limit",
        "ratelimit-remaining",
        "ratelimit-reset",
        "retry-after",
    ] {
        assert_eq!(reply.header(name), None, "{name} on a response no policy applied to");
    }
}

/// A 429 of SPEC §3 step 4 with `message`, `Retry-After` within the window.
fn assert_refused(reply: &Reply, message: &str, window_s: u64) {
    assert_eq!(reply.status, 429, "body: {}", reply.text());
    assert_eq!(reply.text(), json!({ "error": message }).to_string());
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert!(reply.header("x-request-id").is_some(), "X-Request-Id on a 429");
    let retry_after = number(reply, "retry-after");
    assert!(
        (1..=window_s).contains(&retry_after),
        "Retry-After {retry_after} not in 1..={window_s}"
    );
}

/// The value of one series in the `/metrics` text; 0 while it is absent.
async fn metric(gateway: &TestGateway, series: &str) -> f64 {
    let reply = get(&gateway.url("/metrics")).await;
    assert_eq!(reply.status, 200);
    reply
        .text()
        .lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().unwrap())
        })
        .unwrap_or(0.0)
}

/// The status of a `GET path` over a fresh HTTP/1.1 connection, without any
/// async runtime: for load from many OS threads.
fn raw_status(address: SocketAddr, path: &str) -> u16 {
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let response = raw_exchange(address, request.as_bytes(), Duration::from_secs(20));
    response
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP response: {response:?}"))
}

// ---------------------------------------------------------------------------
// 1. The limit and its headers
// ---------------------------------------------------------------------------

/// A route with a policy of 3 per 30 s, "Slow down, burst"; no global policy.
fn three_per_thirty_seconds(rate_limit: &str, upstream: &Upstream) -> String {
    format!(
        r#"
[rate_limit]
{rate_limit}
global = ""
[rate_limit.policies.burst]
window_s = 30
max = 3
message = "Slow down, burst"

{app}
[routes.limited]
prefix = "/limited"
service = "app"
rate_limit = "burst"
"#,
        app = app(upstream),
    )
}

async fn the_max_th_request_passes_and_the_next_gets_429(gateway: &TestGateway, upstream: &Upstream) {
    for remaining in [2, 1, 0] {
        let reply = get(&gateway.url("/limited/a")).await;
        assert_eq!(reply.status, 200, "body: {}", reply.text());
        assert_limit_headers(&reply, 3, 30, remaining);
        assert_eq!(reply.header("retry-after"), None, "Retry-After only on 429");
    }
    let refused = get(&gateway.url("/limited/a")).await;
    assert_refused(&refused, "Slow down, burst", 30);
    assert_limit_headers(&refused, 3, 30, 0);
    assert_eq!(upstream.hits(), 3, "a refused request is never forwarded");
}

#[actix_web::test]
async fn redis_the_max_th_request_passes_and_the_next_gets_429_with_headers() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let gateway = TestGateway::start(&three_per_thirty_seconds(
        &on_redis(&redis, "rl-test-max-redis"),
        &upstream,
    ));
    the_max_th_request_passes_and_the_next_gets_429(&gateway, &upstream).await;
    assert_eq!(
        redis.zcard(&key("rl-test-max-redis", "127.0.0.1", "burst")),
        3,
        "the refused request is not recorded"
    );
}

#[actix_web::test]
async fn memory_the_max_th_request_passes_and_the_next_gets_429_with_headers() {
    let upstream = Upstream::start("app");
    let gateway = TestGateway::start(&three_per_thirty_seconds("backend = \"memory\"", &upstream));
    the_max_th_request_passes_and_the_next_gets_429(&gateway, &upstream).await;
}

#[actix_web::test]
async fn a_client_that_waits_retry_after_seconds_is_admitted_again() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let gateway = TestGateway::start(&format!(
        r#"
[rate_limit]
{limits}
global = "once"
[rate_limit.policies.once]
window_s = 2
max = 1

{app}
[routes.api]
prefix = "/api"
service = "app"
"#,
        limits = on_redis(&redis, "rl-test-retry-after"),
        app = app(&upstream),
    ));
    let url = gateway.url("/api/x");
    assert_eq!(get(&url).await.status, 200);
    let refused = get(&url).await;
    assert_refused(&refused, "Too many requests", 2);
    actix_web::rt::time::sleep(Duration::from_secs(number(&refused, "retry-after"))).await;
    assert_eq!(get(&url).await.status, 200, "the slot freed within Retry-After");
}

// ---------------------------------------------------------------------------
// 2. Stacked policies, unmatched requests, the gateway's own endpoints
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn stacked_policies_show_the_most_restrictive_and_count_all_or_nothing() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let gateway = TestGateway::start(&format!(
        r#"
[rate_limit]
{limits}
global = "global"
[rate_limit.policies.global]
window_s = 60
max = 10
message = "Too many requests from this IP"
[rate_limit.policies.tight]
window_s = 60
max = 3
message = "Too many tight requests"

{app}
[routes.tight]
prefix = "/tight"
service = "app"
rate_limit = "tight"
[routes.open]
prefix = "/open"
service = "app"
[routes.post-only]
prefix = "/post-only"
service = "app"
methods = ["POST"]
"#,
        limits = on_redis(&redis, "rl-test-stacked"),
        app = app(&upstream),
    ));

    // Route policy 3 vs global 10: the route's is the lowest remaining.
    for remaining in [2, 1, 0] {
        let reply = get(&gateway.url("/tight")).await;
        assert_eq!(reply.status, 200);
        assert_limit_headers(&reply, 3, 60, remaining);
    }
    let refused = get(&gateway.url("/tight")).await;
    assert_refused(&refused, "Too many tight requests", 60);
    assert_limit_headers(&refused, 3, 60, 0);

    // All or nothing: the refused request was not recorded by the global
    // policy either, so the global budget is 10 - 3 - 1 = 6 after this one.
    let reply = get(&gateway.url("/open")).await;
    assert_eq!(reply.status, 200);
    assert_limit_headers(&reply, 10, 60, 6);

    // Unmatched requests count against the global policy and carry its headers.
    let reply = get(&gateway.url("/nowhere")).await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.text(), r#"{"error":"Not found"}"#);
    assert_limit_headers(&reply, 10, 60, 5);
    let reply = get(&gateway.url("/post-only")).await;
    assert_eq!(reply.status, 405);
    assert_limit_headers(&reply, 10, 60, 4);

    for remaining in [3, 2, 1, 0] {
        let reply = get(&gateway.url("/open")).await;
        assert_eq!(reply.status, 200);
        assert_limit_headers(&reply, 10, 60, remaining);
    }
    let refused = get(&gateway.url("/open")).await;
    assert_refused(&refused, "Too many requests from this IP", 60);
    assert_limit_headers(&refused, 10, 60, 0);
    let refused = get(&gateway.url("/nowhere")).await;
    assert_refused(&refused, "Too many requests from this IP", 60);
    assert_limit_headers(&refused, 10, 60, 0);

    // The gateway's own endpoints are never limited and carry no headers.
    for _ in 0..3 {
        for path in ["/health", "/metrics"] {
            let reply = get(&gateway.url(path)).await;
            assert_eq!(reply.status, 200, "{path} after the limit is hit");
            assert_no_limit_headers(&reply);
        }
    }
    assert_eq!(
        redis.zcard(&key("rl-test-stacked", "127.0.0.1", "global")),
        10,
        "neither the refusals nor /health and /metrics were recorded"
    );
    assert_eq!(redis.zcard(&key("rl-test-stacked", "127.0.0.1", "tight")), 3);
}

/// The global policy `shared` (3 per 60 s) is also the route's own.
fn the_global_policy_named_by_a_route(rate_limit: &str, upstream: &Upstream) -> String {
    format!(
        r#"
[rate_limit]
{rate_limit}
global = "shared"
[rate_limit.policies.shared]
window_s = 60
max = 3
message = "Too many requests"

{app}
[routes.api]
prefix = "/api"
service = "app"
rate_limit = "shared"
"#,
        app = app(upstream),
    )
}

async fn each_request_counts_once(gateway: &TestGateway) {
    for remaining in [2, 1, 0] {
        let reply = get(&gateway.url("/api/x")).await;
        assert_eq!(reply.status, 200, "body: {}", reply.text());
        assert_limit_headers(&reply, 3, 60, remaining);
    }
    assert_refused(&get(&gateway.url("/api/x")).await, "Too many requests", 60);
}

#[actix_web::test]
async fn redis_a_route_naming_the_global_policy_counts_each_request_once() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let gateway = TestGateway::start(&the_global_policy_named_by_a_route(
        &on_redis(&redis, "rl-test-same-policy"),
        &upstream,
    ));
    each_request_counts_once(&gateway).await;
}

#[actix_web::test]
async fn memory_a_route_naming_the_global_policy_counts_each_request_once() {
    let upstream = Upstream::start("app");
    let gateway = TestGateway::start(&the_global_policy_named_by_a_route("backend = \"memory\"", &upstream));
    each_request_counts_once(&gateway).await;
}

// ---------------------------------------------------------------------------
// 3. Keys: the client address
// ---------------------------------------------------------------------------

/// One route, `/keyed`, with an ip policy `perip` of 2 per 60 s.
fn two_per_minute_by_ip(redis: &RedisServer, prefix: &str, upstream: &Upstream) -> String {
    format!(
        r#"
[rate_limit]
{limits}
global = ""
[rate_limit.policies.perip]
window_s = 60
max = 2
key = "ip"
message = "Too many requests from this IP"

{app}
[routes.keyed]
prefix = "/keyed"
service = "app"
rate_limit = "perip"
"#,
        limits = on_redis(redis, prefix),
        app = app(upstream),
    )
}

#[actix_web::test]
async fn the_redis_key_is_the_prefix_the_client_address_in_a_hash_tag_and_the_policy() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let gateway = TestGateway::start(&two_per_minute_by_ip(&redis, "rl-test-keys", &upstream));

    assert_eq!(get(&gateway.url("/keyed")).await.status, 200);

    let expected = key("rl-test-keys", "127.0.0.1", "perip");
    assert_eq!(expected, "rl-test-keys:{127.0.0.1}:perip");
    assert_eq!(redis.keys("rl-test-keys"), vec![expected.clone()]);
    let pttl = redis.pttl(&expected);
    assert!(
        (1..=60_000).contains(&pttl),
        "the key expires within its window: PTTL {pttl} ms"
    );
}

#[actix_web::test]
async fn a_spoofed_forwarded_for_from_an_untrusted_peer_does_not_change_the_key() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let gateway = TestGateway::start(&two_per_minute_by_ip(&redis, "rl-test-spoof", &upstream));

    let statuses = [
        get_with(&gateway.url("/keyed"), &[("x-forwarded-for", "1.2.3.4")])
            .await
            .status,
        get_with(&gateway.url("/keyed"), &[("x-forwarded-for", "5.6.7.8")])
            .await
            .status,
        get_with(&gateway.url("/keyed"), &[("x-forwarded-for", "9.9.9.9")])
            .await
            .status,
    ];
    assert_eq!(statuses, [200, 200, 429], "the spoofing client is still limited");
    assert_eq!(
        redis.keys("rl-test-spoof"),
        vec![key("rl-test-spoof", "127.0.0.1", "perip")]
    );
}

#[actix_web::test]
async fn behind_a_trusted_proxy_the_right_most_untrusted_forwarded_for_entry_is_the_key() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let gateway = TestGateway::builder()
        .server("trusted_proxies = [\"127.0.0.0/8\"]")
        .start(&two_per_minute_by_ip(&redis, "rl-test-proxy", &upstream));
    let from = async |forwarded_for: &str| {
        get_with(&gateway.url("/keyed"), &[("x-forwarded-for", forwarded_for)])
            .await
            .status
    };

    assert_eq!(from("1.2.3.4").await, 200);
    assert_eq!(from("1.2.3.4").await, 200);
    assert_eq!(from("1.2.3.4").await, 429, "1.2.3.4 spent its budget");
    assert_eq!(from("5.6.7.8").await, 200, "5.6.7.8 has its own budget");
    // 127.0.0.9 is a trusted hop, so 5.6.7.8 is the client; 9.9.9.9 was
    // written by the client and is not believed.
    assert_eq!(from("9.9.9.9, 5.6.7.8, 127.0.0.9").await, 200);
    assert_eq!(from("5.6.7.8").await, 429, "5.6.7.8 spent its budget");
    // A client cannot escape by prepending entries; the right-most counts.
    assert_eq!(from("10.0.0.1, 1.2.3.4").await, 429);

    assert_eq!(
        redis.keys("rl-test-proxy"),
        vec![
            key("rl-test-proxy", "1.2.3.4", "perip"),
            key("rl-test-proxy", "5.6.7.8", "perip"),
        ]
    );
}

#[actix_web::test]
async fn behind_a_trusted_proxy_an_unparsable_right_most_entry_does_not_hand_the_key_to_the_client() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let gateway = TestGateway::builder()
        .server("trusted_proxies = [\"127.0.0.0/8\"]")
        .start(&two_per_minute_by_ip(&redis, "rl-test-proxy-port", &upstream));

    // The proxy wrote its client as `address:port` (as some load balancers
    // do); everything to its left was written by the client. Whatever the
    // gateway makes of the right-most entry, the client must not be able to
    // pick its own key by varying the entries to the left of it.
    let mut statuses = Vec::new();
    for spoofed in ["1.1.1.1", "2.2.2.2", "3.3.3.3"] {
        let forwarded_for = format!("{spoofed}, 203.0.113.7:51234");
        let reply = get_with(&gateway.url("/keyed"), &[("x-forwarded-for", &forwarded_for)]).await;
        statuses.push(reply.status);
    }
    assert_eq!(
        statuses,
        [200, 200, 429],
        "keys used: {:?}",
        redis.keys("rl-test-proxy-port")
    );
}

// ---------------------------------------------------------------------------
// 4. Keys: the user
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn two_users_from_one_address_have_separate_budgets() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let gateway = TestGateway::start(&format!(
        r#"
[auth]
jwt_secret = "{SECRET}"
[rate_limit]
{limits}
global = ""
[rate_limit.policies.per-user]
window_s = 60
max = 2
key = "user"
message = "Too many requests for this user"

{app}
[routes.users]
prefix = "/api/users"
service = "app"
auth = true
rate_limit = "per-user"
"#,
        limits = on_redis(&redis, "rl-test-users"),
        app = app(&upstream),
    ));
    let url = gateway.url("/api/users/me");

    for remaining in [1, 0] {
        let reply = get_as(&url, "alice").await;
        assert_eq!(reply.status, 200, "body: {}", reply.text());
        assert_limit_headers(&reply, 2, 60, remaining);
    }
    let refused = get_as(&url, "alice").await;
    assert_refused(&refused, "Too many requests for this user", 60);
    assert_limit_headers(&refused, 2, 60, 0);

    for remaining in [1, 0] {
        let reply = get_as(&url, "bob").await;
        assert_eq!(reply.status, 200, "bob is not limited by alice's requests");
        assert_limit_headers(&reply, 2, 60, remaining);
    }
    assert_eq!(get_as(&url, "bob").await.status, 429);

    // Without a token the request is refused by auth before user limits count.
    assert_eq!(get(&url).await.status, 401);

    assert_eq!(
        redis.keys("rl-test-users"),
        vec![
            key("rl-test-users", "alice", "per-user"),
            key("rl-test-users", "bob", "per-user"),
        ]
    );
}

#[actix_web::test]
async fn a_user_keyed_global_policy_falls_back_to_the_address_without_a_token() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let gateway = TestGateway::start(&format!(
        r#"
[auth]
jwt_secret = "{SECRET}"
[rate_limit]
{limits}
global = "everyone"
[rate_limit.policies.everyone]
window_s = 60
max = 3
key = "user"
message = "Too many requests"

{app}
[routes.products]
prefix = "/api/products"
service = "app"
[routes.users]
prefix = "/api/users"
service = "app"
auth = true
"#,
        limits = on_redis(&redis, "rl-test-fallback"),
        app = app(&upstream),
    ));

    assert_eq!(get(&gateway.url("/api/products")).await.status, 200);
    assert_eq!(get(&gateway.url("/api/products")).await.status, 200);
    let unmatched = get(&gateway.url("/nowhere")).await;
    assert_eq!(unmatched.status, 404);
    assert_limit_headers(&unmatched, 3, 60, 0);
    assert_eq!(
        redis.zcard(&key("rl-test-fallback", "127.0.0.1", "everyone")),
        3,
        "public and unmatched requests are counted by address"
    );
    assert_refused(&get(&gateway.url("/api/products")).await, "Too many requests", 60);
    assert_refused(&get(&gateway.url("/nowhere")).await, "Too many requests", 60);

    // An authenticated user from the same address is counted by `sub`.
    let reply = get_as(&gateway.url("/api/users/1"), "alice").await;
    assert_eq!(reply.status, 200, "alice has her own budget");
    assert_limit_headers(&reply, 3, 60, 2);
    assert_eq!(
        redis.keys("rl-test-fallback"),
        vec![
            key("rl-test-fallback", "127.0.0.1", "everyone"),
            key("rl-test-fallback", "alice", "everyone"),
        ]
    );
}

// ---------------------------------------------------------------------------
// 5. The fleet: two gateway processes, one Redis
// ---------------------------------------------------------------------------

/// `GET path` `requests` times at once from 10 OS threads, spread
/// round-robin over `addresses`; the statuses.
fn concurrent_statuses(addresses: &[SocketAddr], path: &str, requests: usize) -> Vec<u16> {
    const THREADS: usize = 10;
    let barrier = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|thread| {
            let barrier = barrier.clone();
            let addresses = addresses.to_vec();
            let path = path.to_owned();
            std::thread::spawn(move || {
                barrier.wait();
                (0..requests / THREADS)
                    .map(|i| raw_status(addresses[(thread + i) % addresses.len()], &path))
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    threads.into_iter().flat_map(|thread| thread.join().unwrap()).collect()
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|&&s| s == status).count()
}

fn others(statuses: &[u16]) -> Vec<u16> {
    statuses.iter().copied().filter(|&s| s != 200 && s != 429).collect()
}

#[test]
fn two_gateways_sharing_one_redis_admit_exactly_max_across_both() {
    const REQUESTS: usize = 200;
    let redis = RedisServer::start();
    let upstream = Upstream::start("app");
    // The file says memory; the environment moves both onto the shared Redis.
    let toml = format!(
        r#"
[rate_limit]
backend = "memory"
global = ""
[rate_limit.policies.fleet]
window_s = 60
max = 50
message = "Too many requests from this IP"

{app}
[routes.fleet]
prefix = "/fleet"
service = "app"
rate_limit = "fleet"
"#,
        app = app(&upstream),
    );
    let redis_url = redis.url();
    let env = [
        ("GATEHOUSE__RATE_LIMIT__BACKEND", "redis"),
        ("GATEHOUSE__RATE_LIMIT__REDIS_URL", redis_url.as_str()),
        ("GATEHOUSE__RATE_LIMIT__KEY_PREFIX", "rl-test-fleet"),
        // A backend failure shows as a 503 rather than as an extra admission.
        ("GATEHOUSE__RATE_LIMIT__ON_BACKEND_ERROR", "deny"),
        ("GATEHOUSE__RATE_LIMIT__REDIS_TIMEOUT_MS", "2000"),
    ];
    let gateways = [GatewayProcess::start(&toml, &env), GatewayProcess::start(&toml, &env)];
    let addresses = [gateways[0].address, gateways[1].address];
    for address in addresses {
        assert_eq!(raw_status(address, "/health"), 200);
    }

    let statuses = concurrent_statuses(&addresses, "/fleet/x", REQUESTS);
    assert_eq!(
        (count(&statuses, 200), count(&statuses, 429)),
        (50, REQUESTS - 50),
        "statuses other than 200/429: {:?}",
        others(&statuses)
    );
    assert_eq!(upstream.hits(), 50);
    assert_eq!(redis.zcard(&key("rl-test-fleet", "127.0.0.1", "fleet")), 50);
}

#[test]
fn memory_one_gateway_admits_exactly_max_across_its_workers() {
    const REQUESTS: usize = 200;
    let upstream = Upstream::start("app");
    let gateway = TestGateway::start(&format!(
        r#"
[rate_limit]
backend = "memory"
global = "fleet"
[rate_limit.policies.fleet]
window_s = 60
max = 50

{app}
[routes.fleet]
prefix = "/fleet"
service = "app"
"#,
        app = app(&upstream),
    ));
    let statuses = concurrent_statuses(&[gateway.address], "/fleet/x", REQUESTS);
    assert_eq!(
        (count(&statuses, 200), count(&statuses, 429)),
        (50, REQUESTS - 50),
        "statuses other than 200/429: {:?}",
        others(&statuses)
    );
    assert_eq!(upstream.hits(), 50);
}

// ---------------------------------------------------------------------------
// 6. No burst at the window edge
// ---------------------------------------------------------------------------

/// One admitted request as the client saw it: sent at, answered at.
type Admission = (Instant, Instant);

/// Sends `GET /edge` every 50 ms for `duration` and returns the admissions.
async fn steady_requests(gateway: &TestGateway, duration: Duration) -> (Vec<u16>, Vec<Admission>) {
    let started = Instant::now();
    let mut statuses = Vec::new();
    let mut admitted = Vec::new();
    let mut next = started;
    while next.duration_since(started) < duration {
        let now = Instant::now();
        if next > now {
            actix_web::rt::time::sleep(next - now).await;
        }
        let sent = Instant::now();
        let status = get(&gateway.url("/edge")).await.status;
        if status == 200 {
            admitted.push((sent, Instant::now()));
        }
        statuses.push(status);
        next += Duration::from_millis(50);
    }
    (statuses, admitted)
}

/// A sliding log of 5 per 2 s never admits 6 within 2 s. Each admission
/// happened (by the backend's clock) between its send and its answer, so for
/// any six admissions the sixth's answer comes at least 2 s after the first's
/// send, however slow single requests are.
fn assert_no_burst(statuses: &[u16], admitted: &[Admission]) {
    assert!(
        statuses.iter().all(|&status| status == 200 || status == 429),
        "{statuses:?}"
    );
    assert_eq!(&statuses[..5], &[200; 5], "the first 5 are admitted");
    let slack = Duration::from_millis(10);
    for (i, six) in admitted.windows(6).enumerate() {
        let spread = six[5].1.duration_since(six[0].0);
        assert!(
            spread + slack >= Duration::from_secs(2),
            "admissions {i}..={} fall within {spread:?}: a burst at the window edge",
            i + 5
        );
    }
    let span = admitted.last().unwrap().1.duration_since(admitted[0].0);
    let windows = span.as_secs_f64() / 2.0;
    assert!(
        admitted.len() as f64 <= 5.0 * windows.ceil().max(1.0),
        "{} admissions in {span:?}",
        admitted.len()
    );
    assert!(
        admitted.len() >= 10,
        "a client that keeps retrying is admitted again once the window slides ({} admissions)",
        admitted.len()
    );
}

fn five_per_two_seconds(rate_limit: &str, upstream: &Upstream) -> String {
    format!(
        r#"
[rate_limit]
{rate_limit}
global = "edge"
[rate_limit.policies.edge]
window_s = 2
max = 5
message = "Too many requests"

{app}
[routes.edge]
prefix = "/edge"
service = "app"
"#,
        app = app(upstream),
    )
}

#[actix_web::test]
async fn redis_a_sliding_window_allows_no_burst_at_the_window_edge() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let gateway = TestGateway::start(&five_per_two_seconds(
        &format!("{}redis_timeout_ms = 2000", on_redis(&redis, "rl-test-edge")),
        &upstream,
    ));
    let (statuses, admitted) = steady_requests(&gateway, Duration::from_secs(5)).await;
    assert_no_burst(&statuses, &admitted);
}

#[actix_web::test]
async fn memory_a_sliding_window_allows_no_burst_at_the_window_edge() {
    let upstream = Upstream::start("app");
    let gateway = TestGateway::start(&five_per_two_seconds("backend = \"memory\"", &upstream));
    let (statuses, admitted) = steady_requests(&gateway, Duration::from_secs(5)).await;
    assert_no_burst(&statuses, &admitted);
}

// ---------------------------------------------------------------------------
// 7–8. Redis down, frozen, restarted, flushed
// ---------------------------------------------------------------------------

const TIMEOUT_MS: u64 = 200;
/// SPEC §4: no request waits on Redis longer than `redis_timeout_ms`; allow
/// a generous second for everything else.
const SLOWEST: Duration = Duration::from_millis(TIMEOUT_MS + 1000);

/// A gateway on `redis` with `on_backend_error = mode`, timeout 200 ms, and a
/// global policy `outage` of 4 per 60 s.
fn outage_config(redis_url: &str, prefix: &str, mode: &str, upstream: &Upstream) -> String {
    format!(
        r#"
[rate_limit]
backend = "redis"
redis_url = "{redis_url}"
key_prefix = "{prefix}"
on_backend_error = "{mode}"
redis_timeout_ms = {TIMEOUT_MS}
global = "outage"
[rate_limit.policies.outage]
window_s = 60
max = 4
message = "Too many requests"

{app}
[routes.api]
prefix = "/api"
service = "app"
"#,
        app = app(upstream),
    )
}

/// Sends `n` requests; each is answered within [`SLOWEST`].
async fn requests_within_the_timeout(gateway: &TestGateway, n: usize) -> Vec<Reply> {
    let mut replies = Vec::new();
    for _ in 0..n {
        let (reply, took) = timed_get(&gateway.url("/api/x")).await;
        assert!(took < SLOWEST, "a request took {took:?} (status {})", reply.status);
        replies.push(reply);
    }
    replies
}

fn statuses(replies: &[Reply]) -> Vec<u16> {
    replies.iter().map(|reply| reply.status).collect()
}

/// After `redis.restart()` the gateway, not restarted, counts in Redis again:
/// the key reappears and the limit of 4 holds there.
async fn counting_resumes_in_redis(redis: &mut RedisServer, gateway: &TestGateway, prefix: &str) {
    redis.restart();
    let key = key(prefix, "127.0.0.1", "outage");
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.keys(prefix).is_empty() {
        assert!(Instant::now() < deadline, "the gateway never counted in Redis again");
        let (reply, took) = timed_get(&gateway.url("/api/x")).await;
        assert!(took < SLOWEST, "a request took {took:?} while Redis restarted");
        assert!(
            [200, 429, 503].contains(&reply.status),
            "status {} while Redis restarted",
            reply.status
        );
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(redis.keys(prefix), vec![key.clone()]);
    let mut refused = None;
    for _ in 0..10 {
        let reply = get(&gateway.url("/api/x")).await;
        if reply.status != 200 {
            refused = Some(reply);
            break;
        }
    }
    let refused = refused.expect("the limit applies again");
    assert_refused(&refused, "Too many requests", 60);
    assert_eq!(redis.zcard(&key), 4, "the limit was counted in Redis");
}

#[actix_web::test]
async fn while_redis_is_down_local_mode_keeps_limiting_in_process() {
    let mut redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let prefix = "rl-test-down-local";
    let gateway = TestGateway::start(&outage_config(&redis.url(), prefix, "local", &upstream));
    let errors = "gatehouse_rate_limit_backend_errors_total";

    assert_eq!(statuses(&requests_within_the_timeout(&gateway, 2).await), [200, 200]);
    assert_eq!(redis.zcard(&key(prefix, "127.0.0.1", "outage")), 2);

    let errors_before = metric(&gateway, errors).await;
    redis.kill();
    let replies = requests_within_the_timeout(&gateway, 8).await;
    assert_eq!(
        statuses(&replies),
        [200, 200, 200, 200, 429, 429, 429, 429],
        "the in-process log admits 4 then refuses"
    );
    assert_limit_headers(&replies[3], 4, 60, 0);
    assert_refused(&replies[4], "Too many requests", 60);
    assert!(
        metric(&gateway, errors).await >= errors_before + 8.0,
        "every failed Redis call is counted"
    );

    counting_resumes_in_redis(&mut redis, &gateway, prefix).await;
}

#[actix_web::test]
async fn while_redis_is_down_allow_mode_admits_everything() {
    let mut redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let prefix = "rl-test-down-allow";
    let gateway = TestGateway::start(&outage_config(&redis.url(), prefix, "allow", &upstream));

    assert_eq!(statuses(&requests_within_the_timeout(&gateway, 2).await), [200, 200]);
    redis.kill();
    let replies = requests_within_the_timeout(&gateway, 8).await;
    assert_eq!(statuses(&replies), [200; 8]);

    counting_resumes_in_redis(&mut redis, &gateway, prefix).await;
}

#[actix_web::test]
async fn while_redis_is_down_deny_mode_answers_503() {
    let mut redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let prefix = "rl-test-down-deny";
    let gateway = TestGateway::start(&outage_config(&redis.url(), prefix, "deny", &upstream));

    assert_eq!(statuses(&requests_within_the_timeout(&gateway, 2).await), [200, 200]);
    redis.kill();
    let replies = requests_within_the_timeout(&gateway, 8).await;
    for reply in &replies {
        assert_eq!(reply.status, 503);
        assert_eq!(reply.text(), BACKEND_UNAVAILABLE);
        assert_eq!(reply.header("content-type"), Some("application/json"));
    }
    assert_eq!(upstream.hits(), 2, "nothing was forwarded while Redis was down");
    // The gateway's own endpoints do not depend on Redis.
    assert_eq!(get(&gateway.url("/health")).await.status, 200);

    counting_resumes_in_redis(&mut redis, &gateway, prefix).await;
}

/// Four threads keep sending requests while Redis is killed and, 400 ms
/// later, restarted; each request's status and duration.
fn load_through_a_redis_outage(mode: &str, prefix: &str) -> (Vec<(u16, Duration)>, RedisServer) {
    let mut redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let gateway = TestGateway::start(&format!(
        r#"
[rate_limit]
{limits}
on_backend_error = "{mode}"
redis_timeout_ms = {TIMEOUT_MS}
global = "roomy"
[rate_limit.policies.roomy]
window_s = 60
max = 100000

{app}
[routes.api]
prefix = "/api"
service = "app"
"#,
        limits = on_redis(&redis, prefix),
        app = app(&upstream),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let address = gateway.address;
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let status = raw_status(address, "/api/x");
                    seen.push((status, started.elapsed()));
                }
                seen
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(400));
    redis.kill();
    std::thread::sleep(Duration::from_millis(400));
    redis.restart();
    std::thread::sleep(Duration::from_millis(400));
    stop.store(true, Ordering::Relaxed);
    let seen = threads.into_iter().flat_map(|thread| thread.join().unwrap()).collect();
    // Counting resumed in Redis without restarting the gateway.
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.keys(prefix).is_empty() {
        assert!(Instant::now() < deadline, "the gateway never counted in Redis again");
        raw_status(address, "/api/x");
        std::thread::sleep(Duration::from_millis(50));
    }
    (seen, redis)
}

fn assert_within_the_timeout(seen: &[(u16, Duration)]) {
    let slowest = seen.iter().map(|&(_, took)| took).max().unwrap();
    assert!(slowest < SLOWEST, "a request took {slowest:?}");
    assert!(seen.len() >= 20, "only {} requests were sent", seen.len());
}

#[test]
fn killing_redis_under_load_fails_no_request_in_local_mode() {
    let (seen, _redis) = load_through_a_redis_outage("local", "rl-test-load-local");
    assert_within_the_timeout(&seen);
    let failed: Vec<_> = seen.iter().filter(|&&(status, _)| status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        seen.len()
    );
}

#[test]
fn killing_redis_under_load_answers_only_503_beside_200_in_deny_mode() {
    let (seen, _redis) = load_through_a_redis_outage("deny", "rl-test-load-deny");
    assert_within_the_timeout(&seen);
    let unexpected: Vec<_> = seen
        .iter()
        .filter(|&&(status, _)| status != 200 && status != 503)
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
    assert!(
        seen.iter().any(|&(status, _)| status == 503),
        "Redis was down for 400 ms"
    );
}

#[actix_web::test]
async fn a_frozen_redis_delays_no_request_beyond_the_timeout() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let prefix = "rl-test-frozen";
    let gateway = TestGateway::start(&outage_config(&redis.url(), prefix, "local", &upstream));

    assert_eq!(statuses(&requests_within_the_timeout(&gateway, 2).await), [200, 200]);
    redis.freeze();
    let replies = requests_within_the_timeout(&gateway, 6).await;
    redis.thaw();
    assert_eq!(statuses(&replies), [200, 200, 200, 200, 429, 429]);

    // Once it answers again, the gateway counts there again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (reply, took) = timed_get(&gateway.url("/api/x")).await;
        assert!(took < SLOWEST, "a request took {took:?} after Redis was thawed");
        if redis.zcard(&key(prefix, "127.0.0.1", "outage")) > 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway never counted in Redis again (last status {})",
            reply.status
        );
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_web::test]
async fn a_gateway_whose_redis_is_down_at_start_up_still_starts_and_serves() {
    let mut redis = RedisServer::start();
    redis.kill();
    let upstream = Upstream::start("app");
    let prefix = "rl-test-down-at-start";
    let gateway = TestGateway::start(&outage_config(&redis.url(), prefix, "local", &upstream));

    assert_eq!(get(&gateway.url("/health")).await.status, 200);
    let replies = requests_within_the_timeout(&gateway, 5).await;
    assert_eq!(statuses(&replies), [200, 200, 200, 200, 429]);

    counting_resumes_in_redis(&mut redis, &gateway, prefix).await;
}

/// SPEC §12: a Redis that restarts with its data while no request waits
/// leaves every worker of both gateways holding a dead connection; each one's
/// next decision is retried on a fresh connection instead of counting
/// locally, so the shared limit holds exactly across the restart.
#[actix_web::test]
async fn a_redis_restart_with_its_data_kept_makes_no_decision_local() {
    let mut redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let prefix = "rl-test-restart-kept";
    let toml = format!(
        r#"
[rate_limit]
{limits}
on_backend_error = "local"
redis_timeout_ms = 2000
global = "shared"
[rate_limit.policies.shared]
window_s = 60
max = 10
key = "ip"
message = "Too many requests"

{app}
[routes.api]
prefix = "/api"
service = "app"
"#,
        limits = on_redis(&redis, prefix),
        app = app(&upstream),
    );
    let gateways = [TestGateway::start(&toml), TestGateway::start(&toml)];
    let key = key(prefix, "127.0.0.1", "shared");
    // Each request is a new connection, and each gateway hands its
    // connections to its workers in turn: alternating gateways reaches
    // every worker of both, before the restart and after it.
    let mut statuses = Vec::new();
    for i in 0..6 {
        statuses.push(get(&gateways[i % 2].url("/api/x")).await.status);
    }
    assert_eq!(statuses, [200; 6]);
    assert_eq!(redis.zcard(&key), 6);

    redis.restart_keeping_data();
    assert_eq!(redis.zcard(&key), 6, "the restarted Redis kept the counts");
    for i in 0..8 {
        statuses.push(get(&gateways[i % 2].url("/api/x")).await.status);
    }
    // Since the restart: the helper's PING, one `zcard`, this call, and a
    // reconnection from each of the four workers whose connection had died.
    assert!(
        redis.connections_received() >= 7,
        "every worker was reached after the restart"
    );
    for gateway in &gateways {
        gateway.stop().await;
    }
    assert_eq!(
        (count(&statuses, 200), count(&statuses, 429)),
        (10, 4),
        "statuses in order: {statuses:?}"
    );
    assert_eq!(&statuses[10..], [429; 4], "the limit of 10 held across the restart");
    assert_eq!(redis.zcard(&key), 10, "every admission was counted in Redis");
    assert_eq!(upstream.hits(), 10);
}

#[actix_web::test]
async fn a_script_flush_mid_load_fails_no_request() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let prefix = "rl-test-script-flush";
    let gateway = TestGateway::start(&format!(
        r#"
[rate_limit]
{limits}
on_backend_error = "deny"
redis_timeout_ms = 2000
global = "many"
[rate_limit.policies.many]
window_s = 60
max = 1000

{app}
[routes.api]
prefix = "/api"
service = "app"
"#,
        limits = on_redis(&redis, prefix),
        app = app(&upstream),
    ));

    let mut statuses = Vec::new();
    for round in 0..3 {
        for _ in 0..10 {
            statuses.push(get(&gateway.url("/api/x")).await.status);
        }
        if round < 2 {
            assert_eq!(redis.cli(&["script", "flush"]), "OK");
        }
    }
    assert_eq!(statuses, [200; 30], "a NOSCRIPT is answered by reloading the script");
    assert_eq!(redis.zcard(&key(prefix, "127.0.0.1", "many")), 30);
}

// ---------------------------------------------------------------------------
// 9. The memory backend forgets after the window
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn memory_backend_admits_again_after_the_window_passes() {
    let upstream = Upstream::start("app");
    let gateway = TestGateway::start(&format!(
        r#"
[rate_limit]
backend = "memory"
global = "short"
[rate_limit.policies.short]
window_s = 1
max = 2

{app}
[routes.api]
prefix = "/api"
service = "app"
"#,
        app = app(&upstream),
    ));
    let url = gateway.url("/api/x");
    assert_eq!(get(&url).await.status, 200);
    assert_eq!(get(&url).await.status, 200);
    assert_eq!(get(&url).await.status, 429);
    actix_web::rt::time::sleep(Duration::from_millis(1100)).await;
    let reply = get(&url).await;
    assert_eq!(reply.status, 200, "the window has passed");
    assert_limit_headers(&reply, 2, 1, 1);
}

// ---------------------------------------------------------------------------
// 10. Metrics
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn metrics_count_rate_limited_requests_by_policy() {
    let upstream = Upstream::start("app");
    let gateway = TestGateway::start(&format!(
        r#"
[rate_limit]
backend = "memory"
global = ""
[rate_limit.policies.metrics-probe]
window_s = 60
max = 1

{app}
[routes.api]
prefix = "/api"
service = "app"
rate_limit = "metrics-probe"
"#,
        app = app(&upstream),
    ));
    let series = r#"gatehouse_rate_limited_total{policy="metrics-probe"}"#;
    let before = metric(&gateway, series).await;
    assert_eq!(get(&gateway.url("/api/x")).await.status, 200);
    assert_eq!(metric(&gateway, series).await, before, "an admission is not a refusal");
    assert_eq!(get(&gateway.url("/api/x")).await.status, 429);
    assert_eq!(get(&gateway.url("/api/x")).await.status, 429);
    assert_eq!(metric(&gateway, series).await, before + 2.0);
}
