//! Scale-out on Redis (SPEC §12, with the keys of §2 and the limits of §4),
//! as an operator running a fleet sees it: gateways on a real Redis Cluster
//! holding one limit per client across the fleet, the counting script
//! reloaded on every node after `SCRIPT FLUSH`, a master killed and its
//! replica promoted while requests keep coming, Redis over TLS verified with
//! `upstream.ca_file` (and refused without it), and the constant-memory
//! `sliding_window` algorithm.
//!
//! The cluster tests share one three-master cluster (`RedisCluster::shared`)
//! and tell their keys apart by `key_prefix`; the failover test kills a node,
//! so it starts a cluster of its own, with a replica per master. Clients are
//! told apart by `X-Forwarded-For` from a trusted loopback proxy, and picked
//! so that their keys hash to slots on different masters.

use std::net::SocketAddr;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::*;
use crate::redis_nodes::*;

const BACKEND_UNAVAILABLE: &str = r#"{"error":"Rate limit backend unavailable"}"#;

// ---------------------------------------------------------------------------
// Requests, replies, configuration
// ---------------------------------------------------------------------------

/// `GET path` on a fresh connection, as `client` behind a trusted proxy.
fn get_as_client(address: SocketAddr, path: &str, client: &str) -> RawResponse {
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Forwarded-For: {client}\r\nConnection: close\r\n\r\n");
    RawResponse::parse(&raw_exchange(address, request.as_bytes(), Duration::from_secs(20)))
}

/// [`get_as_client`] and how long the answer took.
fn timed_get_as_client(address: SocketAddr, path: &str, client: &str) -> (RawResponse, Duration) {
    let started = Instant::now();
    let reply = get_as_client(address, path, client);
    (reply, started.elapsed())
}

fn number(reply: &RawResponse, name: &str) -> u64 {
    reply
        .header(name)
        .unwrap_or_else(|| panic!("no {name} header (status {}): {reply:?}", reply.status))
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a number: {reply:?}"))
}

/// A policy as its headers show it: `max` per `window_s`, and the longest
/// `RateLimit-Reset` / `Retry-After` it can give. A sliding log's oldest
/// admission leaves within one window; a sliding window's counts fade out
/// over the fixed window after their own, so a slot can take up to two.
struct Shape {
    max: u64,
    window_s: u64,
    longest_wait_s: u64,
}

impl Shape {
    fn log(max: u64, window_s: u64) -> Self {
        Self {
            max,
            window_s,
            longest_wait_s: window_s,
        }
    }

    fn window(max: u64, window_s: u64) -> Self {
        Self {
            max,
            window_s,
            longest_wait_s: 2 * window_s,
        }
    }
}

/// The `RateLimit-*` headers of SPEC §4.
fn assert_limit_headers(reply: &RawResponse, shape: &Shape, remaining: u64) {
    let Shape {
        max,
        window_s,
        longest_wait_s,
    } = *shape;
    assert_eq!(
        reply.header("ratelimit-policy"),
        Some(format!("{max};w={window_s}").as_str()),
        "RateLimit-Policy: {reply:?}"
    );
    assert_eq!(number(reply, "ratelimit-limit"), max, "RateLimit-Limit");
    assert_eq!(number(reply, "ratelimit-remaining"), remaining, "RateLimit-Remaining");
    let reset = number(reply, "ratelimit-reset");
    assert!(
        (1..=longest_wait_s).contains(&reset),
        "RateLimit-Reset {reset} not in 1..={longest_wait_s}"
    );
}

/// A 429 of SPEC §4: the policy's message as JSON, its headers, `Retry-After`.
fn assert_refused(reply: &RawResponse, message: &str, shape: &Shape) {
    assert_eq!(reply.status, 429, "{reply:?}");
    assert_eq!(reply.body, json!({ "error": message }).to_string());
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_limit_headers(reply, shape, 0);
    let retry_after = number(reply, "retry-after");
    assert!(
        (1..=shape.longest_wait_s).contains(&retry_after),
        "Retry-After {retry_after} not in 1..={}",
        shape.longest_wait_s
    );
}

/// SPEC §4 with `on_backend_error = "deny"`.
fn assert_backend_unavailable(reply: &RawResponse) {
    assert_eq!(reply.status, 503, "{reply:?}");
    assert_eq!(reply.body, BACKEND_UNAVAILABLE);
    assert_eq!(reply.header("content-type"), Some("application/json"));
}

/// The Redis key of SPEC §4: the client key in braces is the hash tag.
fn key(prefix: &str, client: &str, policy: &str) -> String {
    format!("{prefix}:{{{client}}}:{policy}")
}

/// The `[rate_limit]` keys for `cluster`; a failing backend shows as a 503
/// rather than as an admission counted somewhere else.
fn on_cluster(cluster: &RedisCluster, prefix: &str) -> String {
    on_seeds(&cluster.seeds_toml(), prefix)
}

/// [`on_cluster`] with the seeds given as a TOML array.
fn on_seeds(seeds: &str, prefix: &str) -> String {
    format!("backend = \"redis\"\nredis_cluster = {seeds}\nkey_prefix = \"{prefix}\"\non_backend_error = \"deny\"\n")
}

/// `[rate_limit]` with the keys `rate_limit` and the policy tables
/// `policies`, no global policy, and the route `/limited` on `upstream`
/// limited by the policy `policy`.
fn limited_route(rate_limit: &str, policies: &str, policy: &str, upstream: &Upstream) -> String {
    format!(
        r#"
[rate_limit]
{rate_limit}
global = ""
{policies}

[services.app]
instances = {instances}
[routes.limited]
prefix = "/limited"
service = "app"
rate_limit = "{policy}"
"#,
        instances = instances(&[upstream]),
    )
}

/// A gateway that believes `X-Forwarded-For` from loopback, so each test
/// client can have an address of its own.
fn behind_a_proxy() -> GatewayBuilder<TestGateway> {
    TestGateway::builder().server("trusted_proxies = [\"127.0.0.0/8\"]")
}

/// Client addresses (in 198.51.100.0/24) whose keys for `policy` hash to
/// slots on different masters: one per master, then more, round the masters
/// again, until there are `count`.
fn clients_on_every_master(cluster: &RedisCluster, prefix: &str, policy: &str, count: usize) -> Vec<String> {
    let masters = cluster.masters();
    let mut chosen: Vec<(String, u16)> = Vec::new();
    for n in 1..=254 {
        if chosen.len() == count {
            break;
        }
        let client = format!("198.51.100.{n}");
        let master = cluster.master_for_key(&key(prefix, &client, policy));
        // The next master in turn: the first clients cover every master.
        if master == masters[chosen.len() % masters.len()] {
            chosen.push((client, master));
        }
    }
    assert_eq!(chosen.len(), count, "no {count} clients spread over {masters:?}");
    let on: std::collections::BTreeSet<u16> = chosen.iter().map(|(_, master)| *master).collect();
    assert!(on.len() >= 2.min(count), "the clients' keys live on {on:?}");
    chosen.into_iter().map(|(client, _)| client).collect()
}

// ---------------------------------------------------------------------------
// 1. A fleet on a Redis Cluster
// ---------------------------------------------------------------------------

#[test]
fn two_gateways_on_a_redis_cluster_admit_exactly_max_per_client_across_both() {
    const MAX: u64 = 50;
    const PER_CLIENT: usize = 60;
    const THREADS: usize = 12;
    let prefix = "scale-fleet";
    let cluster = RedisCluster::shared();
    let upstream = Upstream::start("app");
    let toml = limited_route(
        &format!("{}redis_timeout_ms = 2000", on_cluster(&cluster, prefix)),
        &format!(
            "[rate_limit.policies.fleet]\nwindow_s = 60\nmax = {MAX}\nmessage = \"Too many requests from this IP\""
        ),
        "fleet",
        &upstream,
    );
    let gateways = [behind_a_proxy().start(&toml), behind_a_proxy().start(&toml)];
    let clients = clients_on_every_master(&cluster, prefix, "fleet", 4);

    // 240 requests at once from 12 threads; request i is client i % 4's,
    // sent to gateway (i / 4) % 2.
    let requests: Vec<(SocketAddr, String)> = (0..clients.len() * PER_CLIENT)
        .map(|i| {
            (
                gateways[(i / clients.len()) % 2].address,
                clients[i % clients.len()].clone(),
            )
        })
        .collect();
    let requests = Arc::new(requests);
    let barrier = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|thread| {
            let (requests, barrier) = (requests.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                (thread..requests.len())
                    .step_by(THREADS)
                    .map(|i| {
                        let (address, client) = &requests[i];
                        (client.clone(), get_as_client(*address, "/limited/x", client))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let replies: Vec<(String, RawResponse)> = threads.into_iter().flat_map(|thread| thread.join().unwrap()).collect();

    for client in &clients {
        let mine: Vec<&RawResponse> = replies
            .iter()
            .filter(|(whose, _)| whose == client)
            .map(|(_, reply)| reply)
            .collect();
        let admitted: Vec<&&RawResponse> = mine.iter().filter(|reply| reply.status == 200).collect();
        let others: Vec<&&RawResponse> = mine
            .iter()
            .filter(|reply| reply.status != 200 && reply.status != 429)
            .collect();
        assert!(others.is_empty(), "{client}: statuses other than 200/429: {others:?}");
        assert_eq!(admitted.len() as u64, MAX, "{client}: admitted across both gateways");
        // One atomic script per decision: each admission saw its own count.
        let mut remaining: Vec<u64> = admitted
            .iter()
            .map(|reply| number(reply, "ratelimit-remaining"))
            .collect();
        remaining.sort();
        assert_eq!(remaining, (0..MAX).collect::<Vec<_>>(), "{client}: RateLimit-Remaining");
        for reply in mine.iter().filter(|reply| reply.status == 429) {
            assert_refused(reply, "Too many requests from this IP", &Shape::log(MAX, 60));
        }
    }
    assert_eq!(
        upstream.hits() as u64,
        MAX * clients.len() as u64,
        "only admissions are forwarded"
    );

    // Each client's key carries its hash tag and lives, complete, on the
    // master serving that tag's slot.
    let expected: Vec<String> = {
        let mut keys: Vec<String> = clients.iter().map(|client| key(prefix, client, "fleet")).collect();
        keys.sort();
        keys
    };
    assert_eq!(cluster.keys(prefix), expected);
    for client in &clients {
        let key = key(prefix, client, "fleet");
        assert_eq!(cluster.slot_of(&key), cluster.slot_of(&format!("{{{client}}}")));
        let owner = cluster.master_for_key(&key);
        assert_eq!(
            cluster.cli(owner, &["--raw", "zcard", &key]),
            MAX.to_string(),
            "{key} on its master {owner}"
        );
    }
}

#[test]
fn a_script_flush_on_every_node_is_answered_by_reloading_the_script() {
    let prefix = "scale-flush";
    let cluster = RedisCluster::shared();
    let upstream = Upstream::start("app");
    let gateway = behind_a_proxy().start(&limited_route(
        &format!("{}redis_timeout_ms = 2000", on_cluster(&cluster, prefix)),
        "[rate_limit.policies.roomy]\nwindow_s = 60\nmax = 1000",
        "roomy",
        &upstream,
    ));
    let clients = clients_on_every_master(&cluster, prefix, "roomy", 3);

    let mut statuses = Vec::new();
    for round in 0..3 {
        for client in &clients {
            for _ in 0..4 {
                statuses.push(get_as_client(gateway.address, "/limited/x", client).status);
            }
        }
        if round < 2 {
            cluster.script_flush_all();
        }
    }
    // With `deny`, a decision that failed (or fell back) would be a 503.
    assert_eq!(
        statuses,
        vec![200; 36],
        "a NOSCRIPT on any node reloads the script there"
    );
    for client in &clients {
        let key = key(prefix, client, "roomy");
        let owner = cluster.master_for_key(&key);
        assert_eq!(
            cluster.cli(owner, &["--raw", "zcard", &key]),
            "12",
            "every decision for {client} was counted in Redis"
        );
    }
}

// ---------------------------------------------------------------------------
// 2. A master fails over
// ---------------------------------------------------------------------------

/// `redis_timeout_ms` of the failover tests.
const FAILOVER_TIMEOUT_MS: u64 = 300;

/// A gateway with one worker (one view of the cluster, so what it learns of
/// a failover shows on every request that follows) on `cluster`, `deny`,
/// [`FAILOVER_TIMEOUT_MS`], the policy `failover` of `max` a minute on
/// `/limited`.
fn gateway_for_failover(cluster: &RedisCluster, prefix: &str, max: u64, upstream: &Upstream) -> TestGateway {
    behind_a_proxy().workers(1).start(&limited_route(
        &format!(
            "{}redis_timeout_ms = {FAILOVER_TIMEOUT_MS}",
            on_cluster(cluster, prefix)
        ),
        &format!("[rate_limit.policies.failover]\nwindow_s = 60\nmax = {max}\nmessage = \"Too many requests\""),
        "failover",
        upstream,
    ))
}

/// `GET /limited/x` as `client`, answered within the deadline of SPEC §4:
/// no request waits on Redis longer than `redis_timeout_ms`, and half a
/// second for everything else (a deadline, not a benchmark).
fn within_deadline(gateway: &TestGateway, client: &str) -> RawResponse {
    let slowest = Duration::from_millis(FAILOVER_TIMEOUT_MS + 500);
    let (reply, took) = timed_get_as_client(gateway.address, "/limited/x", client);
    assert!(took < slowest, "a request took {took:?}: {reply:?}");
    reply
}

#[test]
fn a_killed_master_gets_on_backend_error_until_its_replica_takes_over_then_redis_decides_again() {
    const MAX: u64 = 10;
    let prefix = "scale-failover";
    let cluster = RedisCluster::start(3, 1);
    let upstream = Upstream::start("app");
    let gateway = gateway_for_failover(&cluster, prefix, MAX, &upstream);
    let client = "198.51.100.7";
    let key = key(prefix, client, "failover");
    let request = || within_deadline(&gateway, client);

    for remaining in [9, 8, 7] {
        let reply = request();
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_limit_headers(&reply, &Shape::log(MAX, 60), remaining);
    }
    let replica = *cluster
        .replicas_of_master_of(&key)
        .first()
        .expect("the master has a replica");
    let killed = cluster.kill_master_of(&key);

    // Until the replica says it serves the slot, nothing can answer for
    // this client: every request is `on_backend_error`'s, within the timeout.
    let mut refused_while_down = 0;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reply = request();
        if cluster.promoted(replica, &key) {
            break;
        }
        assert_backend_unavailable(&reply);
        refused_while_down += 1;
        assert!(Instant::now() < deadline, "replica {replica} was never promoted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(refused_while_down >= 1, "no request was sent while the master was down");
    let promoted = cluster.wait_for_failover(&key, Duration::from_secs(15));
    assert_eq!(promoted, replica, "the replica of {killed} took over");

    // The gateway follows the failover without a restart: soon its
    // decisions for this client are Redis's again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut reply = request();
    while reply.status == 503 {
        assert_backend_unavailable(&reply);
        assert!(Instant::now() < deadline, "the gateway never used the promoted replica");
        std::thread::sleep(Duration::from_millis(50));
        reply = request();
    }
    // Admissions on the old master that had not reached the replica are
    // lost (SPEC §12), so between MAX - 3 and MAX more are admitted; then
    // the limit holds, and the new master holds exactly MAX admissions.
    let mut admitted_after = 0;
    while reply.status == 200 {
        admitted_after += 1;
        assert!(admitted_after <= MAX, "more than {MAX} admitted after the failover");
        reply = request();
    }
    assert_refused(&reply, "Too many requests", &Shape::log(MAX, 60));
    assert!(
        admitted_after >= MAX - 3,
        "only {admitted_after} admitted after the failover"
    );
    assert_eq!(cluster.cli(promoted, &["--raw", "zcard", &key]), MAX.to_string());
    assert_refused(&request(), "Too many requests", &Shape::log(MAX, 60));
}

/// A master whose host is lost closes nothing: its connections stay open
/// and nothing answers. Decisions for its slots time out into
/// `on_backend_error`, within `redis_timeout_ms`, and once its replica has
/// taken over the gateway finds the new master without a restart.
#[test]
fn a_master_that_stops_answering_is_left_for_its_replica_once_promoted() {
    let prefix = "scale-frozen";
    let cluster = RedisCluster::start(3, 1);
    let upstream = Upstream::start("app");
    let gateway = gateway_for_failover(&cluster, prefix, 100, &upstream);
    let client = "198.51.100.8";
    let key = key(prefix, client, "failover");
    let request = || within_deadline(&gateway, client);
    assert_eq!(request().status, 200);
    let replica = *cluster.replicas_of_master_of(&key).first().expect("a replica");
    // A client whose key lives on another master.
    let frozen = cluster.master_for_key(&key);
    let bystander = (1..=254)
        .map(|n| format!("198.51.100.{n}"))
        .find(|other| cluster.master_for_key(&self::key(prefix, other, "failover")) != frozen)
        .expect("a client on another master");

    cluster.freeze_master_of(&key);
    assert_backend_unavailable(&request());
    // Until the replica takes over, the other masters' clients are served
    // by Redis as before, however often this client's decisions time out.
    let mut served_meanwhile = 0;
    while !cluster.promoted(replica, &key) {
        assert_backend_unavailable(&request());
        let reply = within_deadline(&gateway, &bystander);
        assert_eq!(reply.status, 200, "a client of a live master: {reply:?}");
        served_meanwhile += 1;
    }
    assert!(served_meanwhile >= 1, "no request was made while the master was silent");
    let promoted = cluster.wait_for_failover(&key, Duration::from_secs(15));
    assert_eq!(promoted, replica);

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut reply = request();
    while reply.status == 503 {
        assert_backend_unavailable(&reply);
        assert!(Instant::now() < deadline, "the gateway kept asking the silent master");
        std::thread::sleep(Duration::from_millis(50));
        reply = request();
    }
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(
        cluster.cli(promoted, &["--raw", "zcard", &key]).parse::<u64>().unwrap() >= 1,
        "the promoted replica counts this client"
    );
}

/// SPEC §12: slots are discovered from any seed node and `MOVED`/`ASK`
/// redirections are followed. The gateway knows one seed; the client's slot
/// then moves, with its keys, to another master while the gateway runs: a
/// decision while the slot is migrating is sent where its key went (`ASK`),
/// and the ones after the move go to the new master (`MOVED`).
#[test]
fn a_slot_that_moves_to_another_master_is_followed_with_its_counts() {
    const MAX: u64 = 5;
    let prefix = "scale-moved";
    let cluster = RedisCluster::start(3, 0);
    let upstream = Upstream::start("app");
    let one_seed = format!("[\"{}\"]", cluster.seed_urls()[0]);
    let gateway = behind_a_proxy().workers(1).start(&limited_route(
        &format!("{}redis_timeout_ms = 2000\n", on_seeds(&one_seed, prefix)),
        &format!("[rate_limit.policies.failover]\nwindow_s = 60\nmax = {MAX}\nmessage = \"Too many requests\""),
        "failover",
        &upstream,
    ));
    let client = "198.51.100.9";
    let key = key(prefix, client, "failover");
    for remaining in [4, 3] {
        let reply = get_as_client(gateway.address, "/limited/x", client);
        assert_limit_headers(&reply, &Shape::log(MAX, 60), remaining);
    }
    let from = cluster.master_for_key(&key);
    let to = *cluster.masters().iter().find(|&&port| port != from).unwrap();

    cluster.move_slot_of(&key, to, || {
        let reply = get_as_client(gateway.address, "/limited/x", client);
        assert_eq!(reply.status, 200, "while the slot migrates: {reply:?}");
        assert_limit_headers(&reply, &Shape::log(MAX, 60), 2);
    });

    for remaining in [1, 0] {
        let reply = get_as_client(gateway.address, "/limited/x", client);
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_limit_headers(&reply, &Shape::log(MAX, 60), remaining);
    }
    assert_refused(
        &get_as_client(gateway.address, "/limited/x", client),
        "Too many requests",
        &Shape::log(MAX, 60),
    );
    assert_eq!(
        cluster.cli(to, &["--raw", "zcard", &key]),
        MAX.to_string(),
        "counted on {to}"
    );
    let slot = cluster.slot_of(&key).to_string();
    assert_eq!(
        cluster.cli(from, &["--raw", "cluster", "countkeysinslot", &slot]),
        "0",
        "nothing left on {from}"
    );
}

// ---------------------------------------------------------------------------
// 3. Redis over TLS
// ---------------------------------------------------------------------------

const TLS_PASSWORD: &str = "tls-redis-password-7f3a9c";

/// The route `/limited` with the policy `tls` of 3 per 60 s on `redis_url`,
/// `ca_file` as `upstream.ca_file` ("" for none), `deny`.
fn on_tls_redis(redis_url: &str, ca_file: &str, prefix: &str, upstream: &Upstream) -> String {
    let rate_limit = format!(
        "backend = \"redis\"\nredis_url = \"{redis_url}\"\nkey_prefix = \"{prefix}\"\n\
         on_backend_error = \"deny\"\nredis_timeout_ms = 1000"
    );
    let policies = "[rate_limit.policies.tls]\nwindow_s = 60\nmax = 3\nmessage = \"Too many requests\"";
    format!(
        "[upstream]\nca_file = {ca_file:?}\n{}",
        limited_route(&rate_limit, policies, "tls", upstream)
    )
}

#[test]
fn a_rediss_backend_verified_with_upstream_ca_file_holds_the_limit_and_keeps_its_password_secret() {
    let prefix = "scale-tls";
    let redis = TlsRedis::start_with_password(TLS_PASSWORD);
    let upstream = Upstream::start("app");
    let ca_file = redis.ca_pem_path().display().to_string();
    let toml = on_tls_redis(&redis.url_with_password(), &ca_file, prefix, &upstream);
    let gateway = behind_a_proxy().start(&toml);

    for remaining in [2, 1, 0] {
        let reply = get_as_client(gateway.address, "/limited/x", "203.0.113.5");
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_limit_headers(&reply, &Shape::log(3, 60), remaining);
    }
    assert_refused(
        &get_as_client(gateway.address, "/limited/x", "203.0.113.5"),
        "Too many requests",
        &Shape::log(3, 60),
    );
    let key = key(prefix, "203.0.113.5", "tls");
    assert_eq!(redis.keys(prefix), vec![key.clone()]);
    assert_eq!(redis.cli(&["--raw", "zcard", &key]), "3", "counted in the TLS Redis");

    for path in ["/health", "/metrics"] {
        let reply = get_as_client(gateway.address, path, "203.0.113.5");
        assert_eq!(reply.status, 200);
        assert!(!reply.body.contains(TLS_PASSWORD), "{path} shows the Redis password");
    }

    // check-config prints the URL without its password.
    let dir = settings_dir(&format!(
        "[server]\nlisten = \"127.0.0.1:{}\"\nworkers = 1\n{toml}",
        free_port()
    ));
    let run = run_gatehouse(dir.path(), Some("test"), &[], &["check-config"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        !run.both().contains(TLS_PASSWORD),
        "check-config printed the password:\n{}",
        run.both()
    );
    let config: toml::Table = run.stdout.parse().unwrap();
    let shown = config["rate_limit"]["redis_url"].as_str().unwrap();
    assert!(
        shown.starts_with("rediss://") && shown.contains(&format!("127.0.0.1:{}", redis.port)),
        "everything but the password is shown: {shown}"
    );
}

#[test]
fn a_rediss_backend_whose_ca_is_not_trusted_is_unreachable() {
    let prefix = "scale-tls-unknown-ca";
    let redis = TlsRedis::start();
    let upstream = Upstream::start("app");
    let gateway = behind_a_proxy().start(&on_tls_redis(&redis.url(), "", prefix, &upstream));

    for _ in 0..3 {
        let (reply, took) = timed_get_as_client(gateway.address, "/limited/x", "203.0.113.6");
        assert!(took < Duration::from_millis(1000 + 500), "a request took {took:?}");
        assert_backend_unavailable(&reply);
    }
    assert_eq!(upstream.hits(), 0, "nothing was forwarded");
    assert!(redis.keys(prefix).is_empty(), "an unverified Redis was written to");
}

#[test]
fn a_cluster_over_tls_verified_with_upstream_ca_file_holds_the_limit_per_client() {
    let prefix = "scale-tls-cluster";
    let cluster = RedisCluster::start_tls(3);
    let upstream = Upstream::start("app");
    let rate_limit = format!("{}redis_timeout_ms = 2000", on_cluster(&cluster, prefix));
    let policies = "[rate_limit.policies.tls]\nwindow_s = 60\nmax = 3\nmessage = \"Too many requests\"";
    let gateway = behind_a_proxy().start(&format!(
        "[upstream]\nca_file = {:?}\n{}",
        cluster.ca_pem_path(),
        limited_route(&rate_limit, policies, "tls", &upstream)
    ));
    let clients = clients_on_every_master(&cluster, prefix, "tls", 3);
    for client in &clients {
        for remaining in [2, 1, 0] {
            let reply = get_as_client(gateway.address, "/limited/x", client);
            assert_eq!(reply.status, 200, "{reply:?}");
            assert_limit_headers(&reply, &Shape::log(3, 60), remaining);
        }
        let refused = get_as_client(gateway.address, "/limited/x", client);
        assert_refused(&refused, "Too many requests", &Shape::log(3, 60));
        let key = key(prefix, client, "tls");
        assert_eq!(
            cluster.cli(cluster.master_for_key(&key), &["--raw", "zcard", &key]),
            "3"
        );
    }
}

#[test]
fn check_config_never_prints_a_password_in_a_cluster_seed() {
    let dir = settings_dir(&format!(
        r#"[server]
listen = "127.0.0.1:{}"
workers = 1
[rate_limit]
backend = "redis"
redis_cluster = ["rediss://:{TLS_PASSWORD}@127.0.0.1:7000", "rediss://:{TLS_PASSWORD}@127.0.0.1:7001"]
[services.app]
instances = ["http://127.0.0.1:3001"]
[routes.app]
prefix = "/app"
service = "app"
"#,
        free_port()
    ));
    let run = run_gatehouse(dir.path(), Some("test"), &[], &["check-config"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        !run.both().contains(TLS_PASSWORD),
        "check-config printed the password:\n{}",
        run.both()
    );
    assert!(
        run.stdout.contains("127.0.0.1:7001"),
        "the seeds are shown: {}",
        run.stdout
    );
}

// ---------------------------------------------------------------------------
// 4. sliding_window
// ---------------------------------------------------------------------------

/// The route `/limited` with the `sliding_window` policy `window` of 5 per
/// 60 s, and `/roomy` with one of 100 000.
fn sliding_windows(rate_limit: &str, upstream: &Upstream) -> String {
    let policies = r#"
[rate_limit.policies.window]
window_s = 60
max = 5
message = "Too many requests in this window"
algorithm = "sliding_window"
[rate_limit.policies.roomy]
window_s = 60
max = 100000
algorithm = "sliding_window"
"#;
    format!(
        "{}\n[routes.roomy]\nprefix = \"/roomy\"\nservice = \"app\"\nrate_limit = \"roomy\"\n",
        limited_route(rate_limit, policies, "window", upstream)
    )
}

/// 5 admitted with the headers counting down, then 429.
fn a_burst_gets_max_then_429(gateway: &TestGateway, client: &str) {
    for remaining in [4, 3, 2, 1, 0] {
        let reply = get_as_client(gateway.address, "/limited/x", client);
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_limit_headers(&reply, &Shape::window(5, 60), remaining);
        assert_eq!(reply.header("retry-after"), None, "Retry-After only on 429");
    }
    for _ in 0..3 {
        let reply = get_as_client(gateway.address, "/limited/x", client);
        assert_refused(&reply, "Too many requests in this window", &Shape::window(5, 60));
    }
}

#[test]
fn redis_a_sliding_window_policy_admits_max_in_a_burst_then_429_in_constant_memory() {
    let prefix = "scale-window";
    let redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let gateway = behind_a_proxy().start(&sliding_windows(
        &format!(
            "backend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"{prefix}\"\non_backend_error = \"deny\"\nredis_timeout_ms = 2000\n",
            redis.url()
        ),
        &upstream,
    ));
    a_burst_gets_max_then_429(&gateway, "203.0.113.9");
    assert_eq!(upstream.hits(), 5);
    let burst = key(prefix, "203.0.113.9", "window");
    assert_eq!(
        redis.keys(prefix),
        vec![burst.clone()],
        "the log's key, in the same place"
    );
    assert_eq!(redis.cli(&["type", &burst]), "hash");

    // A key's size does not depend on how many admissions it counts.
    let roomy = key(prefix, "203.0.113.10", "roomy");
    let size = || {
        let fields: u64 = redis.cli(&["--raw", "hlen", &roomy]).parse().unwrap();
        let bytes: u64 = redis.cli(&["--raw", "memory", "usage", &roomy]).parse().unwrap();
        (fields, bytes)
    };
    assert_eq!(get_as_client(gateway.address, "/roomy", "203.0.113.10").status, 200);
    let (fields_after_one, bytes_after_one) = size();
    for _ in 0..150 {
        assert_eq!(get_as_client(gateway.address, "/roomy", "203.0.113.10").status, 200);
    }
    let (fields, bytes) = size();
    assert_eq!(fields, fields_after_one, "fields after 1 and after 151 admissions");
    assert!(
        bytes <= bytes_after_one + 32,
        "{bytes_after_one} bytes after 1 admission, {bytes} after 151"
    );
}

#[test]
fn memory_a_sliding_window_policy_admits_max_in_a_burst_then_429() {
    let upstream = Upstream::start("app");
    let gateway = behind_a_proxy().start(&sliding_windows("backend = \"memory\"\n", &upstream));
    a_burst_gets_max_then_429(&gateway, "203.0.113.9");
    a_burst_gets_max_then_429(&gateway, "203.0.113.11");
    assert_eq!(upstream.hits(), 10, "each client has its own window");
}

#[test]
fn cluster_a_sliding_window_policy_admits_max_in_a_burst_then_429() {
    let prefix = "scale-window-cluster";
    let cluster = RedisCluster::shared();
    let upstream = Upstream::start("app");
    let gateway = behind_a_proxy().start(&sliding_windows(
        &format!("{}redis_timeout_ms = 2000\n", on_cluster(&cluster, prefix)),
        &upstream,
    ));
    let clients = clients_on_every_master(&cluster, prefix, "window", 3);
    for client in &clients {
        a_burst_gets_max_then_429(&gateway, client);
        let key = key(prefix, client, "window");
        assert_eq!(cluster.cli(cluster.master_for_key(&key), &["type", &key]), "hash");
    }
    assert_eq!(upstream.hits(), 15);
}

// ---------------------------------------------------------------------------
// 5. Reloads
// ---------------------------------------------------------------------------

/// SPEC §7: `rate_limit.redis_cluster` needs a restart; a reload that sets
/// it applies the rest and keeps counting where it counted.
#[actix_web::test]
async fn a_reload_that_sets_redis_cluster_keeps_counting_on_the_running_redis() {
    let prefix = "scale-reload";
    let redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let policies = "[rate_limit.policies.p]\nwindow_s = 60\nmax = 3\n";
    let on_node = format!(
        "backend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"{prefix}\"\non_backend_error = \"deny\"\n",
        redis.url()
    );
    let gateway = behind_a_proxy().start(&limited_route(&on_node, policies, "p", &upstream));
    assert_eq!(get_as_client(gateway.address, "/limited", "203.0.113.20").status, 200);

    let on_a_cluster = format!(
        "{on_node}redis_cluster = [\"{}\"]\n",
        closed_port_url().replace("http://", "redis://")
    );
    std::fs::write(
        gateway.settings_file(),
        gateway.config_text(&limited_route(&on_a_cluster, policies, "p", &upstream)),
    )
    .unwrap();
    assert_eq!(gateway.reload().await, Ok(2), "the rest of the file applies");

    assert_eq!(get_as_client(gateway.address, "/limited", "203.0.113.20").status, 200);
    assert_eq!(
        redis.cli(&["zcard", &key(prefix, "203.0.113.20", "p")]),
        "2",
        "both decisions were made on the running Redis"
    );
}

// ---------------------------------------------------------------------------
// 6. Start-up
// ---------------------------------------------------------------------------

/// SPEC §12: a `sliding_log` policy with `max` above 10 000 is worth a
/// warning that suggests `sliding_window`; a window policy is not.
#[test]
fn a_sliding_log_with_a_large_max_is_warned_about_at_start_up() {
    let upstream = Upstream::start("app");
    let policies = "[rate_limit.policies.hourly_log]\nwindow_s = 3600\nmax = 20000\n\
                    [rate_limit.policies.hourly_window]\nwindow_s = 3600\nmax = 100000\nalgorithm = \"sliding_window\"\n";
    let mut gateway = GatewayProcess::builder().workers(1).start(&limited_route(
        "backend = \"memory\"",
        policies,
        "hourly_log",
        &upstream,
    ));
    let log = gateway.stop_and_read_log();
    let warnings: Vec<&str> = log.lines().filter(|line| line.contains("WARN")).collect();
    assert!(
        warnings
            .iter()
            .any(|line| line.contains("rate_limit.policies.hourly_log") && line.contains("sliding_window")),
        "a warning names the policy and suggests sliding_window:\n{log}"
    );
    assert!(
        !warnings.iter().any(|line| line.contains("hourly_window")),
        "no warning for the window policy:\n{log}"
    );
}

/// SPEC §7: a reload that changes a policy's `window_s` keeps its counts.
/// A sliding window knows no admission times, so what it counted carries
/// into the new window whole (as the estimate under the old one).
#[actix_web::test]
async fn a_sliding_window_keeps_its_counts_when_a_reload_changes_window_s() {
    let prefix = "scale-window-reload";
    let redis = RedisServer::start();
    let upstream = Upstream::start("app");
    let policy = |window_s: u64| {
        format!("[rate_limit.policies.window]\nwindow_s = {window_s}\nmax = 3\nalgorithm = \"sliding_window\"\n")
    };
    let rate_limit = format!(
        "backend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"{prefix}\"\non_backend_error = \"deny\"\n",
        redis.url()
    );
    let gateway = behind_a_proxy().start(&limited_route(&rate_limit, &policy(60), "window", &upstream));
    let client = "203.0.113.30";
    for _ in 0..2 {
        assert_eq!(get_as_client(gateway.address, "/limited/x", client).status, 200);
    }

    std::fs::write(
        gateway.settings_file(),
        gateway.config_text(&limited_route(&rate_limit, &policy(120), "window", &upstream)),
    )
    .unwrap();
    assert_eq!(gateway.reload().await, Ok(2));

    let third = get_as_client(gateway.address, "/limited/x", client);
    assert_eq!(third.status, 200, "{third:?}");
    assert_limit_headers(&third, &Shape::window(3, 120), 0);
    let fourth = get_as_client(gateway.address, "/limited/x", client);
    assert_eq!(
        fourth.status, 429,
        "the two admitted before the reload still count: {fourth:?}"
    );
    let key = key(prefix, client, "window");
    assert_eq!(
        redis.cli(&["hget", &key, "w"]),
        "120000000",
        "the key counts in the new window"
    );
}
