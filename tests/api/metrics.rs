//! `GET /metrics` (SPEC §5): Prometheus text whose counters move with real
//! traffic. The recorder is process-wide, so every test here uses its own
//! route and service names and compares values before and after.

use crate::helpers::*;

async fn scrape(gateway: &TestGateway) -> String {
    let reply = get(&gateway.url("/metrics")).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .header("content-type")
            .is_some_and(|value| value.starts_with("text/plain")),
        "{:?}",
        reply.header("content-type")
    );
    assert!(reply.header("x-request-id").is_some());
    assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
    assert!(
        reply.header("ratelimit-limit").is_none(),
        "/metrics is never rate limited"
    );
    reply.text()
}

#[actix_web::test]
async fn request_counters_and_durations_move_with_traffic() {
    let upstream = Upstream::start("metered");
    let gateway = TestGateway::start(&format!(
        r#"
[rate_limit]
global = "m-global"
[rate_limit.policies.m-global]
window_s = 60
max = 1000
[services.metered-svc]
instances = {}
[routes.metered-route]
prefix = "/metered"
service = "metered-svc"
"#,
        instances(&[&upstream])
    ));
    let labels = [("route", "metered-route"), ("method", "GET"), ("status", "200")];
    let before = scrape(&gateway).await;
    let ok_before = sample(&before, "gatehouse_requests_total", &labels).unwrap_or(0.0);
    let not_found = [("route", "-"), ("method", "GET"), ("status", "404")];
    let not_found_before = sample(&before, "gatehouse_requests_total", &not_found).unwrap_or(0.0);

    for _ in 0..3 {
        assert_eq!(get(&gateway.url("/metered/x")).await.status, 200);
    }
    assert_eq!(get(&gateway.url("/nowhere-metered")).await.status, 404);
    let reply = read_reply(client().post(gateway.url("/metered/y")).send_body("hi").await.unwrap()).await;
    assert_eq!(reply.status, 200);

    let after = scrape(&gateway).await;
    assert_eq!(
        sample(&after, "gatehouse_requests_total", &labels),
        Some(ok_before + 3.0)
    );
    assert_eq!(
        sample(
            &after,
            "gatehouse_requests_total",
            &[("route", "metered-route"), ("method", "POST"), ("status", "200")]
        ),
        Some(1.0)
    );
    assert!(sample(&after, "gatehouse_requests_total", &not_found).unwrap() >= not_found_before + 1.0);
    assert_eq!(
        sample(
            &after,
            "gatehouse_request_duration_seconds_count",
            &[("route", "metered-route")]
        ),
        Some(4.0),
        "the duration histogram counts every request of the route"
    );
    assert!(after.contains("gatehouse_request_duration_seconds_bucket{route=\"metered-route\",le=\"0.001\"}"));
}

#[actix_web::test]
async fn upstream_health_probe_latency_and_errors_are_exported() {
    let live = Upstream::start("live");
    let dying = Upstream::start("dying");
    let dead = dying.url();
    let gateway = TestGateway::start(&format!(
        r#"
[health]
interval_ms = 60000
passive_failures = 1
[services.health-metered]
instances = [{live:?}, {dead:?}]
[routes.health-metered]
prefix = "/hm"
service = "health-metered"
"#,
        live = live.url(),
    ));
    let live_url = live.url();
    let live_labels = [("service", "health-metered"), ("instance", live_url.as_str())];
    let dead_labels = [("service", "health-metered"), ("instance", dead.as_str())];

    // The start-up probe: both pass. Then one stops, still counted healthy
    // (no probe for 60 s).
    assert!(
        eventually(std::time::Duration::from_secs(5), async || {
            let text = scrape(&gateway).await;
            sample(&text, "gatehouse_upstream_probe_duration_seconds_count", &dead_labels).is_some()
                && sample(&text, "gatehouse_upstream_probe_duration_seconds_count", &live_labels).is_some()
        })
        .await,
        "probe latency is exported for both instances"
    );
    let text = scrape(&gateway).await;
    assert_eq!(sample(&text, "gatehouse_upstream_healthy", &live_labels), Some(1.0));
    assert_eq!(sample(&text, "gatehouse_upstream_healthy", &dead_labels), Some(1.0));
    dying.stop().await;

    // Requests that reach the refused instance fail to connect (and are
    // retried on the live one); one failure marks it unhealthy.
    for _ in 0..4 {
        assert_eq!(get(&gateway.url("/hm/x")).await.status, 200);
    }
    let text = scrape(&gateway).await;
    assert!(
        sample(
            &text,
            "gatehouse_upstream_errors_total",
            &[("service", "health-metered"), ("kind", "connect")]
        )
        .is_some_and(|count| count >= 1.0),
        "{text}"
    );
    assert!(
        eventually(std::time::Duration::from_secs(3), async || {
            sample(&scrape(&gateway).await, "gatehouse_upstream_healthy", &dead_labels) == Some(0.0)
        })
        .await,
        "the passively ejected instance reads 0"
    );
    assert_eq!(
        sample(&scrape(&gateway).await, "gatehouse_upstream_healthy", &live_labels),
        Some(1.0)
    );
}
