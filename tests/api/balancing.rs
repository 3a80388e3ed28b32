//! Balancing and health (SPEC §3 steps 6–7, §5 `/health`): round robin over
//! the healthy instances, active probes with their thresholds, passive
//! failures, the one retry of a body-less request, 503 and 504, as a client
//! sees them through real sockets.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use sha2::Digest;

use crate::helpers::*;

/// Service `name` with `urls`, behind the route `/api/<name>`.
fn service(name: &str, urls: &[String]) -> String {
    service_at(name, &format!("/api/{name}"), urls)
}

fn urls(upstreams: &[&Upstream]) -> Vec<String> {
    upstreams.iter().map(|upstream| upstream.url()).collect()
}

/// A fresh client (a new connection, so possibly another worker) per request,
/// or one client whose keep-alive connection stays on one worker.
#[derive(Clone, Copy, Debug)]
enum Connections {
    FreshPerRequest,
    Reused,
}

/// Sends `count` sequential GETs and returns which instance answered each.
async fn answered_by(gateway: &TestGateway, path: &str, count: usize, connections: Connections) -> Vec<String> {
    let shared = client();
    let mut names = Vec::with_capacity(count);
    for _ in 0..count {
        let client = match connections {
            Connections::FreshPerRequest => client(),
            Connections::Reused => shared.clone(),
        };
        let reply = read_reply(client.get(gateway.url(path)).send().await.unwrap()).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        names.push(
            reply
                .header("x-upstream-instance")
                .expect("a proxied answer names its instance")
                .to_owned(),
        );
    }
    names
}

fn tally(names: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for name in names {
        *counts.entry(name.clone()).or_default() += 1;
    }
    counts
}

/// Each of `upstreams` served `count / k` ± 1 of `count` requests, by the
/// response header and by the upstream's own count (`before` = hits earlier).
fn assert_even_spread(names: &[String], upstreams: &[&Upstream], before: &[usize], context: &str) {
    let counts = tally(names);
    let share = names.len() / upstreams.len();
    for (upstream, before) in upstreams.iter().zip(before) {
        let by_header = counts.get(&upstream.name).copied().unwrap_or(0);
        assert!(
            by_header.abs_diff(share) <= 1,
            "{context}: {} served {by_header} of {} requests, expected {share} ± 1 ({counts:?})",
            upstream.name,
            names.len()
        );
        assert_eq!(
            upstream.hits() - before,
            by_header,
            "{context}: the upstream's own count agrees with the header"
        );
    }
    assert_eq!(
        counts.values().sum::<usize>(),
        names.len(),
        "{context}: no answer came from anywhere else: {counts:?}"
    );
}

fn hits(upstreams: &[&Upstream]) -> Vec<usize> {
    upstreams.iter().map(|upstream| upstream.hits()).collect()
}

/// `GET /health`: always 200, JSON, the exact shape of SPEC §5.
async fn checked_health(gateway: &TestGateway) -> Value {
    let reply = health_reply(gateway).await;
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let report = reply.json();
    assert_health_shape(&report);
    report
}

fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

/// `{"status", "services": {name: {"status", "instances": [{url, healthy,
/// response_time_ms, last_check, consecutive_failures, error}]}}, "config":
/// {generation, loaded_at, last_reload_error}}`, with statuses that agree
/// with the instances' flags.
fn assert_health_shape(report: &Value) {
    assert_eq!(keys(report), ["config", "services", "status"], "{report}");
    assert_eq!(
        keys(&report["config"]),
        ["generation", "last_reload_error", "loaded_at"],
        "{report}"
    );
    let services = report["services"].as_object().expect("services is a map");
    let mut with_healthy = 0;
    for (name, service) in services {
        assert_eq!(keys(service), ["instances", "status"], "{name}: {service}");
        let instances = service["instances"].as_array().expect("instances is a list");
        assert!(!instances.is_empty(), "{name} lists its instances");
        let mut any_healthy = false;
        for instance in instances {
            assert_eq!(
                keys(instance),
                [
                    "consecutive_failures",
                    "error",
                    "healthy",
                    "last_check",
                    "response_time_ms",
                    "url"
                ],
                "{name}: {instance}"
            );
            assert!(instance["url"].is_string(), "{instance}");
            let healthy = instance["healthy"].as_bool().expect("healthy is a bool");
            any_healthy |= healthy;
            assert!(instance["consecutive_failures"].is_u64(), "{instance}");
            assert!(
                instance["error"].is_null() || instance["error"].is_string(),
                "{instance}"
            );
            match &instance["last_check"] {
                Value::Null => assert!(
                    instance["response_time_ms"].is_null(),
                    "no response time before the first probe: {instance}"
                ),
                Value::String(at) => {
                    assert_rfc3339_utc_recent(at);
                    assert!(
                        instance["response_time_ms"].is_u64(),
                        "a probed instance has a response time in ms: {instance}"
                    );
                }
                other => panic!("last_check is null or a string, not {other}"),
            }
        }
        with_healthy += usize::from(any_healthy);
        let expected = if any_healthy { "healthy" } else { "unhealthy" };
        assert_eq!(service["status"], expected, "{name}: {service}");
    }
    let expected = if with_healthy == services.len() {
        "ok"
    } else if with_healthy == 0 {
        "down"
    } else {
        "degraded"
    };
    assert_eq!(report["status"], expected, "{report}");
}

/// RFC 3339 in UTC (`…Z`), and a time of this test run.
fn assert_rfc3339_utc_recent(at: &str) {
    assert!(at.ends_with('Z'), "last_check {at:?} ends in Z");
    assert_eq!(at.as_bytes().get(10), Some(&b'T'), "{at:?}");
    let when = humantime::parse_rfc3339(at).unwrap_or_else(|err| panic!("last_check {at:?} is not RFC 3339: {err}"));
    let now = SystemTime::now();
    assert!(
        when <= now + Duration::from_secs(2) && when + Duration::from_secs(120) >= now,
        "last_check {at:?} is a recent time"
    );
}

fn failures(instance: &Value) -> u64 {
    instance["consecutive_failures"].as_u64().unwrap()
}

fn is_healthy(instance: &Value) -> bool {
    instance["healthy"].as_bool().unwrap()
}

/// Waits (up to 5 s) until `/health` reports `status` for the gateway.
async fn overall_status_becomes(gateway: &TestGateway, status: &str) -> bool {
    eventually(Duration::from_secs(5), async || {
        checked_health(gateway).await["status"] == status
    })
    .await
}

/// Waits (up to `limit`) until every instance has been probed once.
async fn wait_for_first_probes(gateway: &TestGateway, limit: Duration) {
    let probed = eventually(limit, async || {
        let report = checked_health(gateway).await;
        report["services"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|service| service["instances"].as_array().unwrap())
            .all(|instance| !instance["last_check"].is_null())
    })
    .await;
    assert!(probed, "every instance is probed at start-up");
}

fn assert_service_unavailable(reply: &Reply, service: &str) {
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(
        reply.text(),
        format!(r#"{{"error":"Service unavailable","service":"{service}"}}"#)
    );
    assert_eq!(reply.header("content-type"), Some("application/json"));
}

async fn post(url: &str, body: &'static str) -> Reply {
    let response = client()
        .post(url)
        .insert_header(("content-type", "text/plain"))
        .send_body(body)
        .await
        .expect("request reaches the gateway");
    read_reply(response).await
}

// ---------------------------------------------------------------------------
// Round robin (step 6)
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn sequential_requests_rotate_evenly_over_two_and_three_instances_whatever_the_workers() {
    for workers in [2, 4] {
        let (a, b, c) = (Upstream::start("a"), Upstream::start("b"), Upstream::start("c"));
        let gateway = TestGateway::builder().workers(workers).start(&format!(
            "[health]\ninterval_ms = 100\ntimeout_ms = 200\n{}{}",
            service("pair", &urls(&[&a, &b])),
            service("trio", &urls(&[&a, &b, &c])),
        ));
        for connections in [Connections::FreshPerRequest, Connections::Reused] {
            let context = format!("{workers} workers, {connections:?}, 2 instances");
            let before = hits(&[&a, &b]);
            let names = answered_by(&gateway, "/api/pair/x", 30, connections).await;
            assert_even_spread(&names, &[&a, &b], &before, &context);

            let context = format!("{workers} workers, {connections:?}, 3 instances");
            let before = hits(&[&a, &b, &c]);
            let names = answered_by(&gateway, "/api/trio/x", 31, connections).await;
            assert_even_spread(&names, &[&a, &b, &c], &before, &context);
        }
        gateway.stop().await;
    }
}

#[actix_web::test]
async fn consecutive_requests_never_repeat_an_instance_over_fresh_connections() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let gateway = TestGateway::builder().workers(4).start(&format!(
        "[health]\ninterval_ms = 100\ntimeout_ms = 200\n{}",
        service("pair", &urls(&[&a, &b])),
    ));
    let names = answered_by(&gateway, "/api/pair", 20, Connections::FreshPerRequest).await;
    for window in names.windows(2) {
        assert_ne!(
            window[0], window[1],
            "the rotation is the process's, not one worker's: {names:?}"
        );
    }
}

#[actix_web::test]
async fn concurrent_requests_on_four_workers_are_spread_evenly_too() {
    let (a, b, c) = (Upstream::start("a"), Upstream::start("b"), Upstream::start("c"));
    let gateway = TestGateway::builder().workers(4).start(&format!(
        "[health]\ninterval_ms = 100\ntimeout_ms = 200\n{}",
        service("trio", &urls(&[&a, &b, &c])),
    ));
    let url = gateway.url("/api/trio/concurrent");
    let requests = (0..30).map(|_| {
        let url = url.clone();
        async move {
            let reply = read_reply(client().get(url).send().await.unwrap()).await;
            assert_eq!(reply.status, 200);
            reply.header("x-upstream-instance").unwrap().to_owned()
        }
    });
    let names = futures_util::future::join_all(requests).await;
    assert_even_spread(&names, &[&a, &b, &c], &[0, 0, 0], "30 concurrent requests");
}

// ---------------------------------------------------------------------------
// Active health checks (§5)
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn a_failing_health_path_removes_the_instance_after_the_threshold_and_passing_brings_it_back() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let gateway = TestGateway::start(&format!(
        "[health]\ninterval_ms = 400\ntimeout_ms = 200\nunhealthy_threshold = 3\nhealthy_threshold = 2\n{}",
        service("pair", &urls(&[&a, &b])),
    ));
    let b_url = b.url();
    wait_for_first_probes(&gateway, Duration::from_secs(3)).await;
    let report = checked_health(&gateway).await;
    assert_eq!(report["status"], "ok");
    let entry = instance(&report, "pair", &b_url);
    assert_eq!(entry["healthy"], true);
    assert_eq!(entry["consecutive_failures"], 0);
    assert_eq!(entry["error"], Value::Null);

    b.set_health(500);

    // Until the third failed probe in a row, b stays healthy and in rotation;
    // from it on, b is out. Every observation must agree with that.
    let mut seen_failing_but_healthy = false;
    let mut checked_traffic_while_failing = false;
    let flipped = eventually(Duration::from_secs(6), async || {
        let report = checked_health(&gateway).await;
        let entry = instance(&report, "pair", &b_url);
        let count = failures(entry);
        assert_eq!(
            is_healthy(entry),
            count < 3,
            "healthy until 3 consecutive failures, not before: {entry}"
        );
        if (1..3).contains(&count) {
            seen_failing_but_healthy = true;
            assert!(entry["error"].is_string(), "the failure is explained: {entry}");
            if !checked_traffic_while_failing {
                let before = b.hits();
                answered_by(&gateway, "/api/pair", 4, Connections::FreshPerRequest).await;
                let still_below = failures(instance(&checked_health(&gateway).await, "pair", &b_url)) < 3;
                if still_below {
                    checked_traffic_while_failing = true;
                    assert_eq!(b.hits() - before, 2, "one failed probe does not take b out of rotation");
                }
            }
        }
        !is_healthy(entry)
    })
    .await;
    assert!(flipped, "b is marked unhealthy after 3 failed probes");
    assert!(
        seen_failing_but_healthy,
        "b stayed healthy after its first failed probe"
    );
    assert!(checked_traffic_while_failing);

    let report = checked_health(&gateway).await;
    let entry = instance(&report, "pair", &b_url);
    assert_eq!(entry["healthy"], false);
    assert!(failures(entry) >= 3, "{entry}");
    assert!(
        entry["error"].as_str().is_some_and(|error| !error.is_empty()),
        "an unhealthy instance says why: {entry}"
    );
    assert_eq!(report["services"]["pair"]["status"], "healthy", "a is left");
    assert_eq!(report["status"], "ok");

    let before = hits(&[&a, &b]);
    let names = answered_by(&gateway, "/api/pair", 8, Connections::FreshPerRequest).await;
    assert_eq!(tally(&names).get("a"), Some(&8), "all traffic goes to a");
    assert_eq!(a.hits() - before[0], 8);
    assert_eq!(b.hits(), before[1], "b gets no traffic while unhealthy");

    b.set_health(200);

    // One passing probe resets the failures but is not enough (threshold 2).
    let mut seen_passing_but_unhealthy = false;
    let recovered = eventually(Duration::from_secs(6), async || {
        let report = checked_health(&gateway).await;
        let entry = instance(&report, "pair", &b_url);
        if !is_healthy(entry) && failures(entry) == 0 {
            seen_passing_but_unhealthy = true;
            assert_eq!(entry["error"], Value::Null, "{entry}");
        }
        is_healthy(entry)
    })
    .await;
    assert!(recovered, "b returns once its health path passes again");
    assert!(
        seen_passing_but_unhealthy,
        "b stayed out after a single passing probe (healthy_threshold = 2)"
    );
    let entry = instance(&checked_health(&gateway).await, "pair", &b_url).clone();
    assert_eq!(entry["consecutive_failures"], 0);
    assert_eq!(entry["error"], Value::Null);

    let before = hits(&[&a, &b]);
    let names = answered_by(&gateway, "/api/pair", 10, Connections::FreshPerRequest).await;
    assert_even_spread(&names, &[&a, &b], &before, "after b's recovery");
}

#[actix_web::test]
async fn health_reports_ok_degraded_and_down_and_no_healthy_instance_means_503() {
    let (a1, a2, b1) = (Upstream::start("a1"), Upstream::start("a2"), Upstream::start("b1"));
    let gateway = TestGateway::start(&format!(
        "[health]\ninterval_ms = 100\ntimeout_ms = 200\nunhealthy_threshold = 2\nhealthy_threshold = 1\n{}{}",
        service("alpha", &urls(&[&a1, &a2])),
        service("beta", &urls(&[&b1])),
    ));
    wait_for_first_probes(&gateway, Duration::from_secs(3)).await;

    let report = checked_health(&gateway).await;
    assert_eq!(report["status"], "ok");
    assert_eq!(keys(&report["services"]), ["alpha", "beta"]);
    let alpha: Vec<&Value> = report["services"]["alpha"]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|instance| &instance["url"])
        .collect();
    assert_eq!(alpha, [&Value::from(a1.url()), &Value::from(a2.url())]);
    for (service, upstream) in [("alpha", &a1), ("alpha", &a2), ("beta", &b1)] {
        let entry = instance(&report, service, &upstream.url());
        assert_eq!(entry["healthy"], true);
        assert_eq!(entry["consecutive_failures"], 0);
        assert_eq!(entry["error"], Value::Null);
        assert!(entry["last_check"].is_string());
        assert!(entry["response_time_ms"].is_u64());
    }

    // beta's only instance fails its probes: beta is down, the gateway degraded.
    b1.set_health(503);
    let degraded = overall_status_becomes(&gateway, "degraded").await;
    assert!(degraded, "one service without a healthy instance: degraded");
    let report = checked_health(&gateway).await;
    assert_eq!(report["services"]["beta"]["status"], "unhealthy");
    assert_eq!(report["services"]["alpha"]["status"], "healthy");
    let entry = instance(&report, "beta", &b1.url());
    assert_eq!(entry["healthy"], false);
    assert!(failures(entry) >= 2, "{entry}");
    assert!(entry["error"].is_string(), "{entry}");

    // b1 still answers requests, so a 503 can only be the balancer's.
    let before = b1.hits();
    assert_service_unavailable(&get(&gateway.url("/api/beta/1")).await, "beta");
    assert_service_unavailable(&post(&gateway.url("/api/beta/1"), "body").await, "beta");
    assert_eq!(b1.hits(), before, "no unhealthy instance is tried");
    assert_eq!(get(&gateway.url("/api/alpha/1")).await.status, 200);

    // Every service without a healthy instance: down.
    a1.set_health(500);
    a2.set_health(500);
    let down = overall_status_becomes(&gateway, "down").await;
    assert!(down, "no service with a healthy instance: down");
    let report = checked_health(&gateway).await;
    assert_eq!(report["services"]["alpha"]["status"], "unhealthy");
    assert_eq!(report["services"]["beta"]["status"], "unhealthy");
    let before = hits(&[&a1, &a2]);
    assert_service_unavailable(&get(&gateway.url("/api/alpha/1")).await, "alpha");
    assert_eq!(hits(&[&a1, &a2]), before);

    // Back up: ok again, and traffic flows.
    for upstream in [&a1, &a2, &b1] {
        upstream.set_health(200);
    }
    let ok = overall_status_becomes(&gateway, "ok").await;
    assert!(ok, "every service healthy again: ok");
    assert_eq!(get(&gateway.url("/api/alpha/1")).await.status, 200);
    assert_eq!(get(&gateway.url("/api/beta/1")).await.status, 200);
}

#[actix_web::test]
async fn an_instance_not_yet_probed_shows_null_last_check_and_response_time() {
    let silent = RawInstance::start(Behaviour::Hold);
    let upstream = Upstream::start("up");
    let gateway = TestGateway::start(&format!(
        "[health]\ninterval_ms = 60000\ntimeout_ms = 2000\n{}",
        service("hanging", &[silent.url(), upstream.url()]),
    ));

    let report = checked_health(&gateway).await;
    let entry = instance(&report, "hanging", &silent.url());
    assert_eq!(entry["last_check"], Value::Null, "{entry}");
    assert_eq!(entry["response_time_ms"], Value::Null, "{entry}");
    assert_eq!(entry["healthy"], true, "instances start healthy");
    assert_eq!(entry["consecutive_failures"], 0);
    assert_eq!(entry["error"], Value::Null);
    assert_eq!(report["status"], "ok");

    // The probe gives up after timeout_ms; a failed first probe applies at
    // once, below the threshold.
    let probed = eventually(Duration::from_secs(6), async || {
        !instance(&checked_health(&gateway).await, "hanging", &silent.url())["last_check"].is_null()
    })
    .await;
    assert!(probed, "the hanging probe times out and is reported");
    let report = checked_health(&gateway).await;
    let entry = instance(&report, "hanging", &silent.url());
    assert_eq!(entry["consecutive_failures"], 1, "{entry}");
    assert_eq!(entry["healthy"], false, "{entry}");
    assert!(entry["error"].is_string(), "{entry}");
    assert!(entry["response_time_ms"].is_u64(), "{entry}");
    assert_eq!(report["status"], "ok", "the other instance keeps the service healthy");
}

#[actix_web::test]
async fn instances_that_fail_their_first_probe_are_unhealthy_at_once() {
    // SPEC §5: with a whole interval (60 s) and three failures to go, only
    // the start-up probe's result applying at once can mark these down.
    let live = Upstream::start("live");
    let dead = [closed_port_url(), closed_port_url()];
    assert_ne!(dead[0], dead[1]);
    let gateway = TestGateway::start(&format!(
        "[health]\ninterval_ms = 60000\ntimeout_ms = 2000\nunhealthy_threshold = 3\npassive_failures = 1\n{}{}",
        service("dead", &dead),
        service("alive", &[live.url()]),
    ));
    wait_for_first_probes(&gateway, Duration::from_secs(2)).await;

    let report = checked_health(&gateway).await;
    assert_eq!(report["status"], "degraded", "{report}");
    assert_eq!(report["services"]["dead"]["status"], "unhealthy");
    assert_eq!(report["services"]["alive"]["status"], "healthy");
    for url in &dead {
        let entry = instance(&report, "dead", url);
        assert_eq!(entry["healthy"], false, "{entry}");
        assert_eq!(entry["consecutive_failures"], 1, "{entry}");
        assert!(entry["error"].is_string(), "{entry}");
    }
    let entry = instance(&report, "alive", &live.url());
    assert_eq!(
        (&entry["healthy"], &entry["consecutive_failures"]),
        (&Value::Bool(true), &Value::from(0))
    );

    // The balancer has no instance to offer. Had the proxy tried one, the
    // refused connection would be a passive failure (passive_failures = 1)
    // and rewrite the instance's error.
    assert_service_unavailable(&get(&gateway.url("/api/dead/x")).await, "dead");
    assert_service_unavailable(&post(&gateway.url("/api/dead/x"), "body").await, "dead");
    assert_eq!(get(&gateway.url("/api/alive/x")).await.status, 200);
    actix_web::rt::time::sleep(Duration::from_millis(150)).await;
    let after = checked_health(&gateway).await;
    assert_eq!(
        after["services"]["dead"], report["services"]["dead"],
        "no request reached an unhealthy instance"
    );
}

#[actix_web::test]
async fn a_hanging_instance_does_not_delay_the_probes_of_the_others() {
    // SPEC §6: every instance is probed each interval_ms, concurrently, each
    // bounded by its own timeout_ms. One black-holed instance must not hold
    // back the verdict on the others for its whole timeout.
    let silent = RawInstance::start(Behaviour::Hold);
    let upstream = Upstream::start("up");
    let gateway = TestGateway::start(&format!(
        "[health]\ninterval_ms = 100\ntimeout_ms = 2000\nunhealthy_threshold = 2\n{}{}",
        service("hanging", &[silent.url()]),
        service("fine", &[upstream.url()]),
    ));
    upstream.set_health(500);
    let started = Instant::now();
    let detected = eventually(Duration::from_secs(8), async || {
        !is_healthy(instance(&checked_health(&gateway).await, "fine", &upstream.url()))
    })
    .await;
    let took = started.elapsed();
    assert!(detected, "the failing instance is marked unhealthy");
    assert!(
        took < Duration::from_millis(1500),
        "two failed probes 100 ms apart take {took:?}: the other instance's 2 s probe held them back"
    );
    drop(silent);
}

// ---------------------------------------------------------------------------
// Retry and failures while forwarding (step 7)
// ---------------------------------------------------------------------------

/// The start-up probe, which every instance here passes (a failed one would
/// take it out at once), no probe after it, and passive failures that never
/// trip: only the retry is at work.
const RETRY_ONLY_HEALTH: &str =
    "[health]\ninterval_ms = 60000\ntimeout_ms = 2000\nunhealthy_threshold = 10\npassive_failures = 1000\n";

/// Stops `upstreams` once every instance has passed its start-up probe: their
/// ports then refuse connections while the gateway still counts them
/// healthy, so what a client sees is the proxy's own handling of a refused
/// connection, not the balancer's.
async fn refuse_after_the_first_probe(gateway: &TestGateway, upstreams: &[&Upstream]) {
    wait_for_first_probes(gateway, Duration::from_secs(5)).await;
    for upstream in upstreams {
        upstream.stop().await;
    }
}

#[actix_web::test]
async fn a_body_less_get_is_retried_on_the_next_instance_when_one_refuses() {
    let (live, refusing) = (Upstream::start("live"), Upstream::start("refusing"));
    let refused = refusing.url();
    let gateway = TestGateway::start(&format!(
        "{RETRY_ONLY_HEALTH}{}",
        service("mixed", &[refused.clone(), live.url()]),
    ));
    refuse_after_the_first_probe(&gateway, &[&refusing]).await;
    for _ in 0..10 {
        let reply = read_reply(client().get(gateway.url("/api/mixed/item")).send().await.unwrap()).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.header("x-upstream-instance"), Some("live"));
    }
    assert_eq!(live.hits(), 10);
    let report = checked_health(&gateway).await;
    assert_eq!(
        instance(&report, "mixed", &refused)["healthy"],
        true,
        "the refusing instance stayed in rotation, so it was picked first for some requests"
    );
}

#[actix_web::test]
async fn a_body_less_get_reset_before_the_response_head_is_retried() {
    let live = Upstream::start("live");
    let closing = RawInstance::start_passing_probes(Behaviour::CloseAfter(Duration::ZERO));
    let gateway = TestGateway::start(&format!(
        "{RETRY_ONLY_HEALTH}{}",
        service("mixed", &[closing.url(), live.url()]),
    ));
    for _ in 0..10 {
        let reply = get(&gateway.url("/api/mixed/item")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.header("x-upstream-instance"), Some("live"));
    }
    assert_eq!(live.hits(), 10);
    assert!(
        closing.requests() >= 4,
        "the closing instance was tried first for its share of the requests, then retried: {} tries",
        closing.requests()
    );
}

#[actix_web::test]
async fn a_request_with_a_body_goes_whole_to_the_next_instance_when_one_refuses_connections() {
    let live = Upstream::start("live");
    let stopping = Upstream::start("stopping");
    let gateway = TestGateway::start(&format!(
        "{RETRY_ONLY_HEALTH}{}",
        service("mixed", &[stopping.url(), live.url()]),
    ));
    refuse_after_the_first_probe(&gateway, &[&stopping]).await;

    for i in 0..20 {
        let body = format!("order {i}: {}", "x".repeat(i * 1000));
        let request = client().post(gateway.url("/api/mixed/orders"));
        // Half with a length, half chunked: both framings are held back.
        let response = if i % 2 == 0 {
            request.send_body(body.clone()).await
        } else {
            let chunks = body
                .as_bytes()
                .chunks(700)
                .map(|chunk| Ok::<_, std::io::Error>(actix_web::web::Bytes::copy_from_slice(chunk)))
                .collect::<Vec<_>>();
            request.send_stream(futures_util::stream::iter(chunks)).await
        };
        let reply = read_reply(response.expect("the gateway answers")).await;
        assert_eq!(reply.status, 200, "POST {i}: {}", reply.text());
        assert_eq!(reply.header("x-upstream-instance"), Some("live"));
        let echoed = reply.json();
        assert_eq!(echoed["body_len"], body.len(), "POST {i}");
        assert_eq!(
            echoed["body_sha256"],
            hex(&sha2::Sha256::digest(body.as_bytes())),
            "POST {i}"
        );
    }
    assert_eq!(live.hits(), 20);
}

#[actix_web::test]
async fn a_request_with_a_body_is_not_retried_after_the_instance_reset_it() {
    let live = Upstream::start("live");
    let closing = RawInstance::start_passing_probes(Behaviour::CloseAfter(Duration::ZERO));
    let gateway = TestGateway::start(&format!(
        "{RETRY_ONLY_HEALTH}{}",
        service("mixed", &[closing.url(), live.url()]),
    ));
    let mut unavailable: usize = 0;
    for _ in 0..6 {
        let reply = post(&gateway.url("/api/mixed/orders"), "a body").await;
        if reply.status == 503 {
            assert_service_unavailable(&reply, "mixed");
            unavailable += 1;
        } else {
            assert_eq!(reply.status, 200, "{}", reply.text());
            assert_eq!(reply.header("x-upstream-instance"), Some("live"));
        }
    }
    assert!(
        unavailable.abs_diff(3) <= 1,
        "the POSTs that picked the resetting instance (half) got 503: {unavailable} of 6"
    );
    assert_eq!(
        closing.requests(),
        unavailable,
        "each reached the resetting instance once"
    );
    assert_eq!(live.hits(), 6 - unavailable, "no 503'd POST reached the live instance");
    for seen in live.seen() {
        assert_eq!((seen.method.as_str(), seen.body_len), ("POST", 6));
    }
}

#[actix_web::test]
async fn a_request_with_a_body_reset_by_the_instance_is_not_retried() {
    let live = Upstream::start("live");
    let closing = RawInstance::start_passing_probes(Behaviour::CloseAfter(Duration::ZERO));
    let gateway = TestGateway::start(&format!(
        "{RETRY_ONLY_HEALTH}{}",
        service("mixed", &[closing.url(), live.url()]),
    ));
    let mut unavailable: usize = 0;
    for _ in 0..6 {
        let reply = post(&gateway.url("/api/mixed/orders"), "a body").await;
        if reply.status == 503 {
            assert_service_unavailable(&reply, "mixed");
            unavailable += 1;
        } else {
            assert_eq!(reply.status, 200, "{}", reply.text());
        }
    }
    assert!(unavailable.abs_diff(3) <= 1, "{unavailable} of 6 got 503");
    assert_eq!(closing.requests(), unavailable);
    assert_eq!(live.hits(), 6 - unavailable);
}

#[actix_web::test]
async fn an_only_instance_that_refuses_gives_503_for_get_and_post() {
    let lonely = Upstream::start("lonely");
    let gone = [Upstream::start("gone-1"), Upstream::start("gone-2")];
    let gateway = TestGateway::start(&format!(
        "{RETRY_ONLY_HEALTH}{}{}",
        service("lonely", &urls(&[&lonely])),
        service("gone", &urls(&[&gone[0], &gone[1]])),
    ));
    refuse_after_the_first_probe(&gateway, &[&lonely, &gone[0], &gone[1]]).await;
    assert_service_unavailable(&get(&gateway.url("/api/lonely/1")).await, "lonely");
    assert_service_unavailable(&post(&gateway.url("/api/lonely/1"), "x").await, "lonely");
    assert_service_unavailable(&get(&gateway.url("/api/gone/1")).await, "gone");
    assert_service_unavailable(&post(&gateway.url("/api/gone/1"), "x").await, "gone");
}

#[actix_web::test]
async fn no_response_head_within_the_request_timeout_gives_504() {
    let upstream = Upstream::start("slow");
    let gateway = TestGateway::start(&format!(
        "[upstream]\nrequest_timeout_ms = 300\n[health]\ninterval_ms = 100\ntimeout_ms = 200\n{}",
        service("slowpoke", &urls(&[&upstream])),
    ));
    let started = Instant::now();
    let reply = get(&gateway.url("/api/slowpoke/slow/3000")).await;
    let took = started.elapsed();
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(reply.text(), r#"{"error":"Gateway timeout","service":"slowpoke"}"#);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert!(took < Duration::from_millis(2500), "504 after {took:?}");
    assert_eq!(upstream.hits(), 1, "a timed-out request is not retried");

    // A quick answer on the same service still goes through.
    assert_eq!(get(&gateway.url("/api/slowpoke/slow/10")).await.status, 200);
}

#[actix_web::test]
async fn a_route_s_timeout_ms_replaces_the_request_timeout_for_that_route_only() {
    let upstream = Upstream::start("slow");
    let gateway = TestGateway::start(&format!(
        "[upstream]\nrequest_timeout_ms = 5000\n{}[routes.hurried]\nprefix = \"/hurried\"\nservice = \"slowpoke\"\ntimeout_ms = 300\n",
        service("slowpoke", &urls(&[&upstream])),
    ));
    let started = Instant::now();
    let reply = get(&gateway.url("/hurried/slow/1500")).await;
    let took = started.elapsed();
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(reply.text(), r#"{"error":"Gateway timeout","service":"slowpoke"}"#);
    assert!(took < Duration::from_millis(1200), "504 after {took:?}");

    // The service's other route keeps upstream.request_timeout_ms.
    let reply = get(&gateway.url("/api/slowpoke/slow/1500")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

// ---------------------------------------------------------------------------
// Passive health (step 7, `health.passive_failures`)
// ---------------------------------------------------------------------------

/// No probe after the start-up one; two proxying failures mark an instance.
const PASSIVE_HEALTH: &str =
    "[health]\ninterval_ms = 60000\ntimeout_ms = 500\nunhealthy_threshold = 2\npassive_failures = 2\n";

#[actix_web::test]
async fn a_stopped_instance_is_marked_unhealthy_by_failed_requests() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let gateway = TestGateway::start(&format!("{PASSIVE_HEALTH}{}", service("pair", &urls(&[&a, &b])),));
    wait_for_first_probes(&gateway, Duration::from_secs(3)).await;
    let names = answered_by(&gateway, "/api/pair", 4, Connections::Reused).await;
    assert_even_spread(&names, &[&a, &b], &[0, 0], "before b stops");

    b.stop().await;
    let b_hits = b.hits();
    let mut sent = 0;
    while is_healthy(instance(&checked_health(&gateway).await, "pair", &b.url())) {
        assert!(
            sent < 8,
            "b is still healthy after {sent} requests (passive_failures = 2)"
        );
        let reply = get(&gateway.url("/api/pair/x")).await;
        assert_eq!(reply.status, 200, "a body-less GET is retried on a");
        assert_eq!(reply.header("x-upstream-instance"), Some("a"));
        sent += 1;
    }
    let entry = instance(&checked_health(&gateway).await, "pair", &b.url()).clone();
    assert_eq!(entry["healthy"], false);
    assert!(
        entry["error"].as_str().is_some_and(|error| error.contains("passive")),
        "the error says the failure was seen while proxying: {entry}"
    );

    let before = a.hits();
    let names = answered_by(&gateway, "/api/pair/y", 10, Connections::FreshPerRequest).await;
    assert_eq!(tally(&names).get("a"), Some(&10));
    assert_eq!(a.hits() - before, 10);
    assert_eq!(b.hits(), b_hits);
}

#[actix_web::test]
async fn once_passively_marked_an_instance_is_not_tried_any_more() {
    let live = Upstream::start("live");
    let closing = RawInstance::start_passing_probes(Behaviour::CloseAfter(Duration::ZERO));
    let gateway = TestGateway::start(&format!(
        "{PASSIVE_HEALTH}{}",
        service("mixed", &[live.url(), closing.url()]),
    ));
    wait_for_first_probes(&gateway, Duration::from_secs(3)).await;
    let mut sent = 0;
    while is_healthy(instance(&checked_health(&gateway).await, "mixed", &closing.url())) {
        assert!(sent < 8, "still healthy after {sent} requests");
        assert_eq!(get(&gateway.url("/api/mixed/x")).await.status, 200);
        sent += 1;
    }
    let entry = instance(&checked_health(&gateway).await, "mixed", &closing.url()).clone();
    assert!(
        entry["error"].as_str().is_some_and(|error| error.contains("passive")),
        "{entry}"
    );
    let tried = closing.requests();
    assert_eq!(tried, 2, "marked after exactly passive_failures = 2 failures");

    for _ in 0..10 {
        let reply = get(&gateway.url("/api/mixed/y")).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-upstream-instance"), Some("live"));
    }
    assert_eq!(
        closing.requests(),
        tried,
        "an unhealthy instance is neither picked nor retried"
    );
}
