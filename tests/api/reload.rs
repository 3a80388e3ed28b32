//! Live reconfiguration (SPEC §7, §2 `server.watch_config`): a changed
//! settings file takes effect on the next request after a reload, whether the
//! reload comes from `TestGateway::reload`, SIGHUP to the binary or the
//! gateway's own watch of its settings folder; an invalid file changes
//! nothing; health, rate-limit counts, keep-alive connections and requests in
//! flight carry over; `/health` and `/metrics` tell the generation.
//!
//! Each test changes its gateway's only settings layer the way an operator
//! does: the whole file rewritten, in place or written beside it and renamed
//! over it, as editors save.
//!
//! The metrics recorder is process-wide, so the exact counts and the
//! generation gauge are read from a `GatewayProcess` of their own; in process,
//! a test only sees a counter move.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use serde_json::{json, Value};

use crate::helpers::*;

/// 46 bytes each, comfortably above the 32-byte minimum.
const SECRET: &str = "gatehouse-reload-test-secret-0123456789abcdefg";
const NEW_SECRET: &str = "gatehouse-rotated-test-secret-9876543210zyxwvu";

const NOT_FOUND: &str = r#"{"error":"Not found"}"#;
const INVALID_TOKEN: &str = r#"{"error":"Invalid token"}"#;

/// How long a triggered reload (SIGHUP, a watched write) may take to show.
const RELOAD_LIMIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Changing the settings file
// ---------------------------------------------------------------------------

/// Rewrites `file` in place (truncate, then write), as `cat > file` does.
fn write_in_place(file: &Path, text: &str) {
    std::fs::write(file, text).unwrap_or_else(|err| panic!("writing {}: {err}", file.display()));
}

/// Writes a hidden temporary file beside `file` and renames it over `file`,
/// as editors save: the settings file is a new inode afterwards.
fn write_then_rename(file: &Path, text: &str) {
    let temporary = file.with_file_name(".default.toml.swp");
    std::fs::write(&temporary, text).unwrap_or_else(|err| panic!("writing {}: {err}", temporary.display()));
    std::fs::rename(&temporary, file).unwrap_or_else(|err| panic!("renaming over {}: {err}", file.display()));
}

/// Writes `toml` (after the builder's `[server]` table) as the gateway's
/// settings and reloads.
async fn reload_with(gateway: &TestGateway, toml: &str) -> Result<u64, String> {
    write_in_place(&gateway.settings_file(), &gateway.config_text(toml));
    gateway.reload().await
}

/// [`reload_with`], which must succeed; the new generation.
async fn reconfigure(gateway: &TestGateway, toml: &str) -> u64 {
    reload_with(gateway, toml)
        .await
        .unwrap_or_else(|err| panic!("the reload was refused: {err}"))
}

// ---------------------------------------------------------------------------
// Configurations
// ---------------------------------------------------------------------------

/// Service `svc` on `upstreams`.
fn svc(upstreams: &[&Upstream]) -> String {
    format!("[services.svc]\ninstances = {}\n", instances(upstreams))
}

/// Route `name` from `prefix` to `svc`.
fn route(name: &str, prefix: &str) -> String {
    format!("[routes.{name}]\nprefix = \"{prefix}\"\nservice = \"svc\"\n")
}

/// `svc` on `upstreams` behind `/api`.
fn api(upstreams: &[&Upstream]) -> String {
    format!("{}{}", svc(upstreams), route("api", "/api"))
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

async fn get_with(url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = client().get(url).no_decompress();
    for &(name, value) in headers {
        request = request.insert_header((name, value));
    }
    read_reply(request.send().await.expect("request reaches the gateway")).await
}

/// The instance that answered a proxied 200.
fn answered_by(reply: &Reply) -> String {
    assert_eq!(reply.status, 200, "body: {}", reply.text());
    reply
        .header("x-upstream-instance")
        .expect("a proxied answer names its instance")
        .to_owned()
}

/// `count` sequential `GET path`s on one keep-alive client; who answered each.
async fn answers(url: &str, count: usize) -> Vec<String> {
    let shared = client();
    let mut names = Vec::with_capacity(count);
    for _ in 0..count {
        let reply = read_reply(shared.get(url).send().await.expect("request reaches the gateway")).await;
        names.push(answered_by(&reply));
    }
    names
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// An HS256 token for `sub`, valid for an hour, signed with `secret`.
fn token(secret: &str, sub: &str) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        &json!({ "sub": sub, "iat": now(), "exp": now() + 3600 }),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn number(reply: &Reply, name: &str) -> u64 {
    reply
        .header(name)
        .unwrap_or_else(|| panic!("no {name} header (status {})", reply.status))
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a number: {:?}", reply.header(name)))
}

// ---------------------------------------------------------------------------
// /health `config`, /metrics
// ---------------------------------------------------------------------------

/// The `config` block of `GET /health` at `health_url`, checked against the
/// shape of SPEC §7.
async fn config_at(health_url: &str) -> Value {
    let reply = get(health_url).await;
    assert_eq!(reply.status, 200, "/health is 200 whatever the state");
    let config = reply.json()["config"].clone();
    let mut keys: Vec<&str> = config
        .as_object()
        .unwrap_or_else(|| panic!("/health has a config object: {config}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["generation", "last_reload_error", "loaded_at"], "{config}");
    assert!(config["generation"].is_u64(), "generation is a number: {config}");
    let loaded_at = config["loaded_at"].as_str().expect("loaded_at is a string");
    humantime::parse_rfc3339_weak(loaded_at)
        .unwrap_or_else(|err| panic!("loaded_at {loaded_at:?} is not RFC 3339: {err}"));
    assert!(
        config["last_reload_error"].is_null() || config["last_reload_error"].is_string(),
        "last_reload_error is null or a message: {config}"
    );
    config
}

async fn generation_at(health_url: &str) -> u64 {
    config_at(health_url).await["generation"].as_u64().unwrap()
}

/// Waits ([`RELOAD_LIMIT`] at most) until `/health` reports `generation`;
/// asserts it got there.
async fn wait_for_generation(health_url: &str, generation: u64) {
    let reached = eventually(RELOAD_LIMIT, async || generation_at(health_url).await >= generation).await;
    assert!(reached, "the reload to generation {generation} never showed in /health");
    assert_eq!(
        generation_at(health_url).await,
        generation,
        "exactly one reload, not more"
    );
}

/// Asserts that `/health` keeps reporting `generation` for `period`.
async fn assert_generation_stays(health_url: &str, generation: u64, period: Duration, context: &str) {
    let until = Instant::now() + period;
    loop {
        let seen = generation_at(health_url).await;
        assert_eq!(seen, generation, "{context}: the generation moved");
        if Instant::now() >= until {
            return;
        }
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn scrape(metrics_url: &str) -> String {
    let reply = get(metrics_url).await;
    assert_eq!(reply.status, 200);
    reply.text()
}

async fn reloads_total(metrics_url: &str, result: &str) -> f64 {
    sample(
        &scrape(metrics_url).await,
        "gatehouse_config_reloads_total",
        &[("result", result)],
    )
    .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// 1. After `reload()`, the next request sees the new configuration
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn a_reload_bumps_the_generation_even_when_nothing_changed() {
    let upstream = Upstream::start("u1");
    let gateway = TestGateway::start(&api(&[&upstream]));
    let health_url = gateway.url("/health");
    let first = config_at(&health_url).await;
    assert_eq!(first["generation"], 1, "generation 1 at start-up: {first}");
    assert_eq!(first["last_reload_error"], Value::Null);

    assert_eq!(reconfigure(&gateway, &api(&[&upstream])).await, 2);
    let second = config_at(&health_url).await;
    assert_eq!(second["generation"], 2, "{second}");
    assert_eq!(second["last_reload_error"], Value::Null);
    let (first_at, second_at) = (
        humantime::parse_rfc3339_weak(first["loaded_at"].as_str().unwrap()).unwrap(),
        humantime::parse_rfc3339_weak(second["loaded_at"].as_str().unwrap()).unwrap(),
    );
    assert!(second_at >= first_at, "loaded_at moves forward: {first} then {second}");

    assert_eq!(reconfigure(&gateway, &api(&[&upstream])).await, 3);
    assert_eq!(generation_at(&health_url).await, 3);
    assert_eq!(answered_by(&get(&gateway.url("/api/x")).await), "u1");
}

#[actix_web::test]
async fn a_route_added_by_a_reload_answers_the_next_request() {
    let upstream = Upstream::start("u1");
    let gateway = TestGateway::start(&api(&[&upstream]));
    let before = get(&gateway.url("/extra/1")).await;
    assert_eq!(before.status, 404);
    assert_eq!(before.text(), NOT_FOUND);

    let toml = format!("{}{}", api(&[&upstream]), route("extra", "/extra"));
    assert_eq!(reconfigure(&gateway, &toml).await, 2);

    let after = get(&gateway.url("/extra/1")).await;
    assert_eq!(answered_by(&after), "u1");
    assert_eq!(upstream.last_seen().target, "/extra/1");
    // Every worker has it: each request here is a new connection.
    for _ in 0..6 {
        assert_eq!(answered_by(&get(&gateway.url("/extra/2")).await), "u1");
    }
    assert_eq!(answered_by(&get(&gateway.url("/api/1")).await), "u1");
}

#[actix_web::test]
async fn a_route_removed_by_a_reload_is_not_found_on_the_next_request() {
    let upstream = Upstream::start("u1");
    let gateway = TestGateway::start(&format!("{}{}", api(&[&upstream]), route("extra", "/extra")));
    assert_eq!(answered_by(&get(&gateway.url("/extra/1")).await), "u1");
    let hits = upstream.hits();

    assert_eq!(reconfigure(&gateway, &api(&[&upstream])).await, 2);

    let after = get(&gateway.url("/extra/1")).await;
    assert_eq!(after.status, 404);
    assert_eq!(after.text(), NOT_FOUND);
    assert_eq!(upstream.hits(), hits, "a request to a removed route is not forwarded");
    assert_eq!(answered_by(&get(&gateway.url("/api/1")).await), "u1");
}

#[actix_web::test]
async fn a_changed_prefix_routes_from_the_next_request() {
    let upstream = Upstream::start("u1");
    let gateway = TestGateway::start(&format!("{}{}", svc(&[&upstream]), route("moving", "/old")));
    assert_eq!(answered_by(&get(&gateway.url("/old/item")).await), "u1");
    assert_eq!(get(&gateway.url("/new/item")).await.status, 404);

    let toml = format!("{}{}", svc(&[&upstream]), route("moving", "/new"));
    assert_eq!(reconfigure(&gateway, &toml).await, 2);

    assert_eq!(answered_by(&get(&gateway.url("/new/item")).await), "u1");
    assert_eq!(upstream.last_seen().target, "/new/item");
    let old = get(&gateway.url("/old/item")).await;
    assert_eq!(old.status, 404);
    assert_eq!(old.text(), NOT_FOUND);
}

#[actix_web::test]
async fn an_instance_added_by_a_reload_joins_the_round_robin() {
    let (u1, u2) = (Upstream::start("u1"), Upstream::start("u2"));
    let gateway = TestGateway::start(&api(&[&u1]));
    assert_eq!(answers(&gateway.url("/api/x"), 3).await, ["u1", "u1", "u1"]);

    assert_eq!(reconfigure(&gateway, &api(&[&u1, &u2])).await, 2);

    let names = answers(&gateway.url("/api/x"), 4).await;
    let by_u2 = names.iter().filter(|name| *name == "u2").count();
    assert!(
        (1..=3).contains(&by_u2),
        "the round robin reaches the new instance and keeps the old one: {names:?}"
    );
    assert_eq!(u2.hits(), by_u2, "u2's own count agrees");
}

#[actix_web::test]
async fn an_instance_removed_by_a_reload_gets_no_new_request() {
    let (u1, u2) = (Upstream::start("u1"), Upstream::start("u2"));
    let gateway = TestGateway::start(&api(&[&u1, &u2]));
    let names = answers(&gateway.url("/api/x"), 4).await;
    assert!(
        names.contains(&"u2".to_owned()),
        "u2 is in rotation at first: {names:?}"
    );
    let u2_hits = u2.hits();

    assert_eq!(reconfigure(&gateway, &api(&[&u1])).await, 2);

    assert_eq!(answers(&gateway.url("/api/x"), 6).await, ["u1"; 6]);
    assert_eq!(u2.hits(), u2_hits, "the removed instance took no new request");
}

#[actix_web::test]
async fn an_unchanged_instance_keeps_its_pooled_upstream_connection_across_a_reload() {
    let upstream = Upstream::start("u1");
    let gateway = TestGateway::builder().workers(1).start(&api(&[&upstream]));
    assert_eq!(answered_by(&get(&gateway.url("/api/before")).await), "u1");
    let before = upstream
        .last_seen()
        .peer
        .expect("the upstream saw the gateway's address");

    let with_extra = format!("{}{}", api(&[&upstream]), route("extra", "/extra"));
    assert_eq!(reconfigure(&gateway, &with_extra).await, 2);

    assert_eq!(answered_by(&get(&gateway.url("/api/after")).await), "u1");
    let after = upstream.last_seen();
    assert_eq!(after.target, "/api/after");
    assert_eq!(
        after.peer,
        Some(before),
        "the request after the reload came on the connection pooled before it"
    );
}

/// A route `/limited` with the policy `burst` of `max` per minute.
fn limited(upstream: &Upstream, max: u64) -> String {
    format!(
        r#"
[rate_limit]
[rate_limit.policies.burst]
window_s = 60
max = {max}
message = "Slow down, burst"

{svc}
[routes.limited]
prefix = "/limited"
service = "svc"
rate_limit = "burst"
"#,
        svc = svc(&[upstream]),
    )
}

#[actix_web::test]
async fn a_raised_max_admits_more_from_the_next_request_and_says_so_in_the_headers() {
    let upstream = Upstream::start("u1");
    let gateway = TestGateway::start(&limited(&upstream, 3));
    for remaining in [2, 1, 0] {
        let reply = get(&gateway.url("/limited/a")).await;
        assert_eq!(reply.status, 200, "body: {}", reply.text());
        assert_eq!(number(&reply, "ratelimit-limit"), 3);
        assert_eq!(number(&reply, "ratelimit-remaining"), remaining);
    }
    let refused = get(&gateway.url("/limited/a")).await;
    assert_eq!(refused.status, 429, "body: {}", refused.text());
    assert_eq!(refused.text(), r#"{"error":"Slow down, burst"}"#);

    assert_eq!(reconfigure(&gateway, &limited(&upstream, 5)).await, 2);

    // The three admissions already logged count against the new max; the
    // refused fourth request was never recorded.
    for remaining in [1, 0] {
        let reply = get(&gateway.url("/limited/a")).await;
        assert_eq!(reply.status, 200, "body: {}", reply.text());
        assert_eq!(number(&reply, "ratelimit-limit"), 5);
        assert_eq!(number(&reply, "ratelimit-remaining"), remaining);
        assert_eq!(reply.header("ratelimit-policy"), Some("5;w=60"));
    }
    let refused = get(&gateway.url("/limited/a")).await;
    assert_eq!(refused.status, 429, "body: {}", refused.text());
    assert_eq!(number(&refused, "ratelimit-limit"), 5);
    assert_eq!(upstream.hits(), 5, "three before the reload, two after");
}

/// `/secure` needs a token signed with `secret`.
fn secured(upstream: &Upstream, secret: &str) -> String {
    format!(
        "[auth]\njwt_secret = \"{secret}\"\n{}[routes.secure]\nprefix = \"/secure\"\nservice = \"svc\"\nauth = true\n",
        svc(&[upstream])
    )
}

#[actix_web::test]
async fn a_new_jwt_secret_refuses_tokens_of_the_old_one_and_accepts_its_own() {
    let upstream = Upstream::start("u1");
    let gateway = TestGateway::start(&secured(&upstream, SECRET));
    let url = gateway.url("/secure/me");
    let (old, new) = (bearer(&token(SECRET, "alice")), bearer(&token(NEW_SECRET, "alice")));
    // The old token is verified (and may be cached) before the reload.
    assert_eq!(answered_by(&get_with(&url, &[("authorization", &old)]).await), "u1");
    let refused = get_with(&url, &[("authorization", &new)]).await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.text(), INVALID_TOKEN);

    assert_eq!(reconfigure(&gateway, &secured(&upstream, NEW_SECRET)).await, 2);

    let refused = get_with(&url, &[("authorization", &old)]).await;
    assert_eq!(refused.status, 403, "body: {}", refused.text());
    assert_eq!(refused.text(), INVALID_TOKEN);
    let admitted = get_with(&url, &[("authorization", &new)]).await;
    assert_eq!(answered_by(&admitted), "u1");
    assert_eq!(upstream.last_seen().header("x-user-id"), Some("alice"));
}

// ---------------------------------------------------------------------------
// 2. The triggers: SIGHUP, and the watched settings folder
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn sighup_reloads_the_binary_and_a_changed_file_alone_does_not() {
    let upstream = Upstream::start("u1");
    let gateway = GatewayProcess::start(&api(&[&upstream]), &[]);
    let health_url = gateway.url("/health");
    let first = config_at(&health_url).await;
    assert_eq!(first["generation"], 1, "{first}");

    let toml = format!("{}{}", api(&[&upstream]), route("extra", "/extra"));
    write_in_place(&gateway.settings_file(), &gateway.config_text(&toml));
    // `watch_config` is off by default: the file waits for the signal.
    assert_generation_stays(
        &health_url,
        1,
        Duration::from_millis(1500),
        "a write without watch_config",
    )
    .await;
    assert_eq!(get(&gateway.url("/extra/1")).await.status, 404);

    gateway.signal("HUP");
    wait_for_generation(&health_url, 2).await;
    let second = config_at(&health_url).await;
    assert_eq!(second["last_reload_error"], Value::Null, "{second}");
    assert_ne!(second["loaded_at"], Value::Null);

    assert_eq!(answered_by(&get(&gateway.url("/extra/1")).await), "u1");
    assert_eq!(answered_by(&get(&gateway.url("/api/1")).await), "u1");
}

/// A gateway in process that watches its settings folder.
fn watching(toml: &str) -> TestGateway {
    TestGateway::builder().server("watch_config = true").start(toml)
}

#[actix_web::test]
async fn with_watch_config_each_edit_in_place_reloads_once() {
    let upstream = Upstream::start("u1");
    let gateway = watching(&api(&[&upstream]));
    let (file, health_url) = (gateway.settings_file(), gateway.url("/health"));

    let with_first = format!("{}{}", api(&[&upstream]), route("first", "/first"));
    write_in_place(&file, &gateway.config_text(&with_first));
    wait_for_generation(&health_url, 2).await;
    assert_eq!(answered_by(&get(&gateway.url("/first")).await), "u1");
    assert_generation_stays(&health_url, 2, Duration::from_millis(1500), "one edit").await;

    let with_second = format!("{}{}", api(&[&upstream]), route("second", "/second"));
    write_in_place(&file, &gateway.config_text(&with_second));
    wait_for_generation(&health_url, 3).await;
    assert_eq!(answered_by(&get(&gateway.url("/second")).await), "u1");
    assert_eq!(get(&gateway.url("/first")).await.status, 404);
    assert_generation_stays(&health_url, 3, Duration::from_millis(1500), "a second edit").await;
}

#[actix_web::test]
async fn with_watch_config_a_write_then_rename_reloads_once_and_the_watch_survives_it() {
    let upstream = Upstream::start("u1");
    let gateway = watching(&api(&[&upstream]));
    let (file, health_url) = (gateway.settings_file(), gateway.url("/health"));

    let renamed = format!("{}{}", api(&[&upstream]), route("renamed", "/renamed"));
    write_then_rename(&file, &gateway.config_text(&renamed));
    wait_for_generation(&health_url, 2).await;
    assert_eq!(answered_by(&get(&gateway.url("/renamed")).await), "u1");
    assert_generation_stays(&health_url, 2, Duration::from_millis(1500), "one rename").await;

    // The file is a new inode now; an edit in place of it is still seen.
    let edited = format!("{}{}", api(&[&upstream]), route("edited", "/edited"));
    write_in_place(&file, &gateway.config_text(&edited));
    wait_for_generation(&health_url, 3).await;
    assert_eq!(answered_by(&get(&gateway.url("/edited")).await), "u1");
    assert_eq!(get(&gateway.url("/renamed")).await.status, 404);
}

#[actix_web::test]
async fn with_watch_config_a_burst_of_writes_is_one_reload_of_the_last_one() {
    let upstream = Upstream::start("u1");
    let gateway = watching(&api(&[&upstream]));
    let (file, health_url) = (gateway.settings_file(), gateway.url("/health"));

    for step in 0..5 {
        let toml = format!("{}{}", api(&[&upstream]), route("burst", &format!("/burst-{step}")));
        write_in_place(&file, &gateway.config_text(&toml));
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for_generation(&health_url, 2).await;
    assert_generation_stays(&health_url, 2, Duration::from_millis(1500), "five writes 20 ms apart").await;
    assert_eq!(answered_by(&get(&gateway.url("/burst-4")).await), "u1");
    for step in 0..4 {
        let stale = get(&gateway.url(&format!("/burst-{step}"))).await;
        assert_eq!(stale.status, 404, "only the last write is in force");
    }
}

#[actix_web::test]
async fn with_watch_config_another_file_in_the_settings_folder_triggers_no_reload() {
    let upstream = Upstream::start("u1");
    let gateway = watching(&api(&[&upstream]));
    let (file, health_url) = (gateway.settings_file(), gateway.url("/health"));
    let folder = file.parent().expect("the settings file is in a folder").to_owned();

    std::fs::write(folder.join("notes.txt"), "remember to rotate the secret\n").unwrap();
    std::fs::write(folder.join("notes.txt"), "rotated\n").unwrap();
    assert_generation_stays(&health_url, 1, Duration::from_millis(1500), "a write to notes.txt").await;
    assert_eq!(config_at(&health_url).await["last_reload_error"], Value::Null);

    // The watch itself works: the settings file is seen.
    let toml = format!("{}{}", api(&[&upstream]), route("extra", "/extra"));
    write_in_place(&file, &gateway.config_text(&toml));
    wait_for_generation(&health_url, 2).await;
    assert_eq!(answered_by(&get(&gateway.url("/extra")).await), "u1");
}

/// Points the settings file at `..data/default.toml`, with `..data` a
/// symlink to the folder `..<version>`, as a Kubernetes ConfigMap volume
/// does; swapping `..data` atomically is how the kubelet updates it.
fn configmap_version(folder: &Path, version: &str, text: &str) {
    let versioned = folder.join(format!("..{version}"));
    std::fs::create_dir(&versioned).unwrap();
    std::fs::write(versioned.join("default.toml"), text).unwrap();
    let next = folder.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{version}"), &next).unwrap();
    std::fs::rename(&next, folder.join("..data")).unwrap();
}

#[actix_web::test]
async fn with_watch_config_a_configmap_data_symlink_swap_reloads() {
    let upstream = Upstream::start("u1");
    let gateway = watching(&api(&[&upstream]));
    let (file, health_url) = (gateway.settings_file(), gateway.url("/health"));
    let folder = file.parent().expect("the settings file is in a folder").to_owned();

    // Moving to the ConfigMap layout is itself a rename over the file.
    let first = format!("{}{}", api(&[&upstream]), route("first", "/first"));
    configmap_version(&folder, "v1", &gateway.config_text(&first));
    let link = folder.join("default.toml.link");
    std::os::unix::fs::symlink("..data/default.toml", &link).unwrap();
    std::fs::rename(&link, &file).unwrap();
    wait_for_generation(&health_url, 2).await;
    assert_eq!(answered_by(&get(&gateway.url("/first")).await), "u1");

    // The kubelet's update: a new version folder, then `..data` swapped.
    let second = format!("{}{}", api(&[&upstream]), route("second", "/second"));
    configmap_version(&folder, "v2", &gateway.config_text(&second));
    wait_for_generation(&health_url, 3).await;
    assert_eq!(answered_by(&get(&gateway.url("/second")).await), "u1");
    assert_eq!(get(&gateway.url("/first")).await.status, 404);
}

// ---------------------------------------------------------------------------
// 3. An invalid file changes nothing
// ---------------------------------------------------------------------------

/// What a client sees of `/api/x` and `/extra/x`: status and who answered.
async fn snapshot(gateway: &TestGateway) -> Vec<(u16, Option<String>, String)> {
    let mut seen = Vec::new();
    for path in ["/api/x", "/extra/x"] {
        let reply = get(&gateway.url(path)).await;
        let body = if reply.status == 200 {
            reply.json()["target"].as_str().unwrap_or_default().to_owned()
        } else {
            reply.text()
        };
        seen.push((
            reply.status,
            reply.header("x-upstream-instance").map(str::to_owned),
            body,
        ));
    }
    seen
}

/// Starts on `/api` → `svc` on one instance; reloads with `invalid` (which
/// also adds `/extra`) and expects a refusal naming `key`; then with `valid`.
async fn an_invalid_file_changes_nothing_until_a_valid_one_comes(
    invalid: impl Fn(&Upstream) -> String,
    valid: impl Fn(&Upstream) -> String,
    key: &str,
) {
    let upstream = Upstream::start("u1");
    let gateway = TestGateway::start(&api(&[&upstream]));
    let (health_url, metrics_url) = (gateway.url("/health"), gateway.url("/metrics"));
    let before = snapshot(&gateway).await;
    assert_eq!(before[0].0, 200);
    assert_eq!(before[1].0, 404);
    let config_before = config_at(&health_url).await;
    let failures_before = reloads_total(&metrics_url, "failure").await;

    let error = reload_with(&gateway, &invalid(&upstream))
        .await
        .expect_err("an invalid file is refused");
    assert!(error.contains(key), "the refusal names {key}: {error}");

    assert_eq!(snapshot(&gateway).await, before, "the old configuration keeps serving");
    let config = config_at(&health_url).await;
    assert_eq!(config["generation"], 1, "a failed reload is no generation: {config}");
    assert_eq!(config["loaded_at"], config_before["loaded_at"], "{config}");
    let reported = config["last_reload_error"]
        .as_str()
        .unwrap_or_else(|| panic!("last_reload_error holds the message: {config}"));
    assert!(reported.contains(key), "last_reload_error names {key}: {reported}");
    // Process-wide counter: other tests may fail reloads at the same time.
    let failures = reloads_total(&metrics_url, "failure").await;
    assert!(
        failures > failures_before,
        "the failure counter moved: {failures_before} → {failures}"
    );

    assert_eq!(reconfigure(&gateway, &valid(&upstream)).await, 2);
    let config = config_at(&health_url).await;
    assert_eq!(config["generation"], 2, "{config}");
    assert_eq!(
        config["last_reload_error"],
        Value::Null,
        "a successful reload clears the error: {config}"
    );
    assert_eq!(answered_by(&get(&gateway.url("/extra/x")).await), "u1");
    assert_eq!(answered_by(&get(&gateway.url("/api/x")).await), "u1");
}

fn with_extra(upstream: &Upstream) -> String {
    format!("{}{}", api(&[upstream]), route("extra", "/extra"))
}

#[actix_web::test]
async fn an_unknown_key_fails_the_reload_and_the_old_configuration_keeps_serving() {
    an_invalid_file_changes_nothing_until_a_valid_one_comes(
        |upstream| format!("{}strip_prefx = true\n", with_extra(upstream)),
        with_extra,
        "routes.extra.strip_prefx",
    )
    .await;
}

#[actix_web::test]
async fn an_instance_that_is_not_a_url_fails_the_reload_and_the_old_configuration_keeps_serving() {
    an_invalid_file_changes_nothing_until_a_valid_one_comes(
        |upstream| {
            format!(
                "[services.svc]\ninstances = [{:?}, \"not a url\"]\n{}{}",
                upstream.url(),
                route("api", "/api"),
                route("extra", "/extra")
            )
        },
        with_extra,
        "services.svc.instances",
    )
    .await;
}

#[actix_web::test]
async fn a_route_naming_a_missing_policy_fails_the_reload_and_the_old_configuration_keeps_serving() {
    an_invalid_file_changes_nothing_until_a_valid_one_comes(
        |upstream| format!("{}rate_limit = \"nope\"\n", with_extra(upstream)),
        with_extra,
        "routes.extra.rate_limit",
    )
    .await;
}

// ---------------------------------------------------------------------------
// 4. Health carries over; a new instance is probed at once
// ---------------------------------------------------------------------------

fn is_healthy(report: &Value, url: &str) -> bool {
    instance(report, "svc", url)["healthy"]
        .as_bool()
        .unwrap_or_else(|| panic!("healthy is a bool: {report}"))
}

#[actix_web::test]
async fn an_unhealthy_instance_stays_out_across_a_reload_that_leaves_it_alone_and_recovers_after() {
    let (u1, u2) = (Upstream::start("u1"), Upstream::start("u2"));
    let health_settings =
        "[health]\ninterval_ms = 100\ntimeout_ms = 1000\nunhealthy_threshold = 1\nhealthy_threshold = 1\n";
    let gateway = TestGateway::start(&format!("{health_settings}{}", api(&[&u1, &u2])));
    u2.set_health(500);
    let out = eventually(Duration::from_secs(5), async || {
        !is_healthy(&health(&gateway).await, &u2.url())
    })
    .await;
    assert!(out, "u2 fails its probes and goes unhealthy");

    let toml = format!("{health_settings}{}{}", api(&[&u1, &u2]), route("extra", "/extra"));
    assert_eq!(reconfigure(&gateway, &toml).await, 2);

    let report = health(&gateway).await;
    assert!(
        !is_healthy(&report, &u2.url()),
        "right after the reload u2 is still out: {report}"
    );
    assert!(is_healthy(&report, &u1.url()), "{report}");
    assert_eq!(answers(&gateway.url("/api/x"), 6).await, ["u1"; 6]);
    assert_eq!(answers(&gateway.url("/extra/x"), 2).await, ["u1"; 2]);
    assert_eq!(u2.hits(), 0, "an unhealthy instance gets no traffic");

    u2.set_health(200);
    let back = eventually(Duration::from_secs(5), async || {
        is_healthy(&health(&gateway).await, &u2.url())
    })
    .await;
    assert!(back, "u2 passes its probes again and comes back");
    let names = answers(&gateway.url("/api/x"), 4).await;
    assert!(names.contains(&"u2".to_owned()), "u2 is in rotation again: {names:?}");
}

#[actix_web::test]
async fn an_instance_added_by_a_reload_is_probed_at_once_not_at_the_next_interval() {
    let (u1, u3) = (Upstream::start("u1"), Upstream::start("u3"));
    u3.set_health(500);
    // A long interval: only a probe at once can show within the limit below.
    let health_settings = "[health]\ninterval_ms = 30000\ntimeout_ms = 1000\nunhealthy_threshold = 1\n";
    let gateway = TestGateway::start(&format!("{health_settings}{}", api(&[&u1])));
    let first_probe = eventually(Duration::from_secs(5), async || {
        !instance(&health(&gateway).await, "svc", &u1.url())["last_check"].is_null()
    })
    .await;
    assert!(first_probe, "u1 is probed at start-up");

    assert_eq!(
        reconfigure(&gateway, &format!("{health_settings}{}", api(&[&u1, &u3]))).await,
        2
    );
    let listed = health(&gateway).await;
    instance(&listed, "svc", &u3.url());

    let probed = eventually(Duration::from_secs(3), async || {
        let report = health(&gateway).await;
        let entry = instance(&report, "svc", &u3.url());
        !entry["last_check"].is_null() && entry["healthy"] == false
    })
    .await;
    assert!(
        probed,
        "the new instance is probed at once and its failing probe takes it out: {}",
        health(&gateway).await
    );
    let u3_hits = u3.hits();
    assert_eq!(answers(&gateway.url("/api/x"), 4).await, ["u1"; 4]);
    assert_eq!(u3.hits(), u3_hits);
    let report = health(&gateway).await;
    assert!(
        !instance(&report, "svc", &u1.url())["last_check"].is_null() && is_healthy(&report, &u1.url()),
        "{report}"
    );
}

// ---------------------------------------------------------------------------
// 5. Rate-limit counts carry over
// ---------------------------------------------------------------------------

/// `/limited` with the policy `kept` (3 per minute) on `backend`, and
/// `/other` when `with_other`.
fn kept_policy(backend: &str, upstream: &Upstream, with_other: bool) -> String {
    let other = if with_other {
        route("other", "/other")
    } else {
        String::new()
    };
    format!(
        r#"
[rate_limit]
{backend}
[rate_limit.policies.kept]
window_s = 60
max = 3
message = "Kept count"

{svc}
[routes.limited]
prefix = "/limited"
service = "svc"
rate_limit = "kept"
{other}"#,
        svc = svc(&[upstream]),
    )
}

async fn counts_survive_a_reload_that_leaves_the_policy_alone(backend: &str) {
    let upstream = Upstream::start("u1");
    let gateway = TestGateway::start(&kept_policy(backend, &upstream, false));
    for remaining in [2, 1] {
        let reply = get(&gateway.url("/limited/x")).await;
        assert_eq!(reply.status, 200, "body: {}", reply.text());
        assert_eq!(number(&reply, "ratelimit-remaining"), remaining);
    }

    assert_eq!(reconfigure(&gateway, &kept_policy(backend, &upstream, true)).await, 2);
    assert_eq!(answered_by(&get(&gateway.url("/other/x")).await), "u1");

    let third = get(&gateway.url("/limited/x")).await;
    assert_eq!(third.status, 200, "the third of 3 passes: {}", third.text());
    assert_eq!(number(&third, "ratelimit-remaining"), 0, "two admissions carried over");
    let fourth = get(&gateway.url("/limited/x")).await;
    assert_eq!(fourth.status, 429, "body: {}", fourth.text());
    assert_eq!(fourth.text(), r#"{"error":"Kept count"}"#);
    assert_eq!(upstream.hits(), 4, "three on /limited, one on /other");
}

#[actix_web::test]
async fn memory_rate_limit_counts_survive_a_reload_that_leaves_the_policy_alone() {
    counts_survive_a_reload_that_leaves_the_policy_alone("backend = \"memory\"\nglobal = \"\"").await;
}

#[actix_web::test]
async fn redis_rate_limit_counts_survive_a_reload_that_leaves_the_policy_alone() {
    let redis = RedisServer::start();
    let backend = format!(
        "backend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"rl-test-reload\"\nglobal = \"\"",
        redis.url()
    );
    counts_survive_a_reload_that_leaves_the_policy_alone(&backend).await;
    assert_eq!(
        redis.zcard("rl-test-reload:{127.0.0.1}:kept"),
        3,
        "three admissions in Redis"
    );
}

#[actix_web::test]
async fn a_policy_removed_by_a_reload_starts_from_zero_when_it_comes_back() {
    let upstream = Upstream::start("u1");
    let memory = "backend = \"memory\"\nglobal = \"\"";
    let gateway = TestGateway::start(&kept_policy(memory, &upstream, false));
    for _ in 0..3 {
        assert_eq!(get(&gateway.url("/limited/x")).await.status, 200);
    }
    assert_eq!(get(&gateway.url("/limited/x")).await.status, 429);

    // Without the policy (and the route that named it), its counts go.
    let without = format!("[rate_limit]\n{memory}\n{}", api(&[&upstream]));
    assert_eq!(reconfigure(&gateway, &without).await, 2);
    assert_eq!(get(&gateway.url("/limited/x")).await.status, 404);

    assert_eq!(reconfigure(&gateway, &kept_policy(memory, &upstream, false)).await, 3);
    for remaining in [2, 1, 0] {
        let reply = get(&gateway.url("/limited/x")).await;
        assert_eq!(reply.status, 200, "a fresh count: {}", reply.text());
        assert_eq!(number(&reply, "ratelimit-remaining"), remaining);
    }
    assert_eq!(get(&gateway.url("/limited/x")).await.status, 429);
}

// ---------------------------------------------------------------------------
// 6. Under load: nothing refused, nothing reset, nothing mixed
// ---------------------------------------------------------------------------

/// One HTTP/1.1 keep-alive connection on a blocking socket, for load from
/// OS threads. A closed or failed connection is an error, not a reconnect.
struct KeepAliveClient {
    connection: BufReader<TcpStream>,
}

/// Status and answering instance of one response; the body is read and dropped.
struct Answer {
    status: u16,
    instance: Option<String>,
}

impl KeepAliveClient {
    fn connect(address: SocketAddr) -> Self {
        let stream = TcpStream::connect(address).expect("the gateway accepts the connection");
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            connection: BufReader::new(stream),
        }
    }

    fn get(&mut self, path: &str) -> Result<Answer, String> {
        let request = format!("GET {path} HTTP/1.1\r\nHost: gateway\r\n\r\n");
        self.connection
            .get_mut()
            .write_all(request.as_bytes())
            .map_err(|err| format!("GET {path}: sending: {err}"))?;
        self.read_answer().map_err(|err| format!("GET {path}: {err}"))
    }

    fn read_line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.connection.read_line(&mut line) {
            Ok(0) => Err("the connection closed".to_owned()),
            Ok(_) => Ok(line.trim_end_matches(['\r', '\n']).to_owned()),
            Err(err) => Err(format!("reading: {err}")),
        }
    }

    fn read_answer(&mut self) -> Result<Answer, String> {
        let status_line = self.read_line()?;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("not a status line: {status_line:?}"))?;
        let (mut length, mut chunked, mut instance) = (None, false, None);
        loop {
            let line = self.read_line()?;
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| format!("not a header line: {line:?}"))?;
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = Some(value.parse::<usize>().map_err(|err| format!("{line:?}: {err}"))?),
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "connection" if value.eq_ignore_ascii_case("close") => {
                    return Err(format!("the gateway closes the connection (status {status})"));
                }
                "x-upstream-instance" => instance = Some(value.to_owned()),
                _ => {}
            }
        }
        if chunked {
            loop {
                let size_line = self.read_line()?;
                let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|err| format!("chunk size {size_line:?}: {err}"))?;
                self.skip(size)?;
                if !self.read_line()?.is_empty() {
                    return Err("no CRLF after a chunk".to_owned());
                }
                if size == 0 {
                    break;
                }
            }
        } else {
            let length = length.ok_or_else(|| format!("a {status} without a length on a keep-alive connection"))?;
            self.skip(length)?;
        }
        Ok(Answer { status, instance })
    }

    fn skip(&mut self, length: usize) -> Result<(), String> {
        let mut body = vec![0; length];
        self.connection
            .read_exact(&mut body)
            .map_err(|err| format!("reading a body of {length} bytes: {err}"))
    }
}

/// What one load thread saw.
#[derive(Default)]
struct Tally {
    requests: usize,
    /// Proxied 200s by answering instance.
    answered_by: BTreeMap<String, usize>,
    /// Anything unexpected, the first few.
    problems: Vec<String>,
    problem_count: usize,
}

impl Tally {
    fn problem(&mut self, problem: String) {
        self.problem_count += 1;
        if self.problems.len() < 10 {
            self.problems.push(problem);
        }
    }
}

/// Tells the load threads to stop when dropped, so a test that fails
/// halfway leaves none running.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Requests `/api/load`, `/a` and `/b` in turn over one keep-alive
/// connection until `stop`. `/api` must be 200; `/a` (config A: u1, u2) and
/// `/b` (config B: u2, u3) 200 or 404, and a 200 from an instance of the
/// same configuration as the route: a request never sees one configuration's
/// routes with the other's services.
fn load(address: SocketAddr, stop: Arc<AtomicBool>, progress: Arc<AtomicUsize>) -> Tally {
    let mut client = KeepAliveClient::connect(address);
    let mut tally = Tally::default();
    let expected: [(&str, &[u16], &[&str]); 3] = [
        ("/api/load", &[200], &["u1", "u2", "u3"]),
        ("/a", &[200, 404], &["u1", "u2"]),
        ("/b", &[200, 404], &["u2", "u3"]),
    ];
    'run: while !stop.load(Ordering::SeqCst) {
        for (path, statuses, instances) in expected {
            tally.requests += 1;
            progress.fetch_add(1, Ordering::SeqCst);
            match client.get(path) {
                Ok(answer) => {
                    if !statuses.contains(&answer.status) {
                        tally.problem(format!("GET {path}: status {}", answer.status));
                    }
                    if answer.status == 200 {
                        let name = answer.instance.unwrap_or_default();
                        if !instances.contains(&name.as_str()) {
                            tally.problem(format!("GET {path}: answered by {name:?}"));
                        }
                        *tally.answered_by.entry(name).or_default() += 1;
                    }
                }
                Err(err) => {
                    tally.problem(err);
                    break 'run;
                }
            }
        }
    }
    tally
}

#[actix_web::test]
async fn twenty_reloads_under_keep_alive_load_refuse_reset_and_mix_nothing() {
    let (u1, u2, u3, u4) = (
        Upstream::start("u1"),
        Upstream::start("u2"),
        Upstream::start("u3"),
        Upstream::start("u4"),
    );
    let config_a = format!("{}{}", api(&[&u1, &u2]), route("a", "/a"));
    let config_b = format!("{}{}", api(&[&u2, &u3]), route("b", "/b"));
    let gateway = TestGateway::start(&config_b);

    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let progress = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (address, stop, progress) = (gateway.address, stop.0.clone(), progress.clone());
            std::thread::spawn(move || load(address, stop, progress))
        })
        .collect();
    let started = eventually(Duration::from_secs(10), async || progress.load(Ordering::SeqCst) >= 40).await;
    assert!(started, "the load runs");

    // Start on B; reload to A, B, A, …: the twentieth reload is B again.
    for reload in 0..20u64 {
        let config = if reload % 2 == 0 { &config_a } else { &config_b };
        assert_eq!(reconfigure(&gateway, config).await, reload + 2);
        let at = progress.load(Ordering::SeqCst);
        let moved = eventually(Duration::from_secs(10), async || {
            progress.load(Ordering::SeqCst) >= at + 12
        })
        .await;
        assert!(moved, "requests keep flowing after reload {}", reload + 1);
    }
    stop.0.store(true, Ordering::SeqCst);
    let tallies: Vec<Tally> = clients.into_iter().map(|client| client.join().unwrap()).collect();

    let problems: Vec<&String> = tallies.iter().flat_map(|tally| &tally.problems).collect();
    let problem_count: usize = tallies.iter().map(|tally| tally.problem_count).sum();
    assert_eq!(problem_count, 0, "the clients saw no error: {problems:#?}");
    let requests: usize = tallies.iter().map(|tally| tally.requests).sum();
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    for tally in &tallies {
        assert!(tally.requests >= 20, "each client kept sending: {}", tally.requests);
        for (name, count) in &tally.answered_by {
            *answered.entry(name.clone()).or_default() += count;
        }
    }
    for upstream in [&u1, &u2, &u3] {
        assert_eq!(
            answered.get(&upstream.name).copied().unwrap_or(0),
            upstream.hits(),
            "every request {} took was answered ({requests} requests, {answered:?})",
            upstream.name
        );
    }
    assert!(
        u1.hits() > 0 && u3.hits() > 0,
        "both configurations served: {answered:?}"
    );
    assert_eq!(u4.hits(), 0, "an instance no configuration lists is never used");

    // The last reload was to B: u1 is out, /a is gone, /b is there.
    let u1_hits = u1.hits();
    let (u2_hits, u3_hits) = (u2.hits(), u3.hits());
    let names = answers(&gateway.url("/api/after"), 20).await;
    assert!(
        names.iter().all(|name| name == "u2" || name == "u3"),
        "after B only u2 and u3 answer: {names:?}"
    );
    assert_eq!(u1.hits(), u1_hits, "u1 took no new request");
    assert_eq!(u2.hits() + u3.hits(), u2_hits + u3_hits + 20);
    assert!(u2.hits() > u2_hits && u3.hits() > u3_hits, "{names:?}");
    assert_eq!(get(&gateway.url("/a")).await.status, 404);
    let names = answers(&gateway.url("/b"), 4).await;
    assert!(names.iter().all(|name| name == "u2" || name == "u3"), "{names:?}");
    assert_eq!(u4.hits(), 0);
}

// ---------------------------------------------------------------------------
// 7. A request in flight finishes on the configuration it started with
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn a_slow_request_in_flight_completes_on_the_instance_a_reload_removed() {
    let (u1, u2) = (Upstream::start("u1"), Upstream::start("u2"));
    let gateway = TestGateway::start(&api(&[&u1]));
    let url = gateway.url("/api/slow/2000");
    let in_flight = actix_web::rt::spawn(async move { get(&url).await });
    let arrived = eventually(Duration::from_secs(5), async || u1.hits() == 1).await;
    assert!(arrived, "the slow request reached u1");

    assert_eq!(reconfigure(&gateway, &api(&[&u2])).await, 2);
    assert_eq!(
        answered_by(&get(&gateway.url("/api/x")).await),
        "u2",
        "new requests go to u2"
    );

    let reply = in_flight.await.expect("the slow request finishes");
    assert_eq!(reply.status, 200, "body: {}", reply.text());
    let body = reply.json();
    assert_eq!(body["instance"], "u1", "{body}");
    assert_eq!(body["target"], "/api/slow/2000", "{body}");
    assert_eq!(u1.hits(), 1, "u1 took nothing after the reload");
}

// ---------------------------------------------------------------------------
// 8. Keys that need a restart
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn a_reload_that_changes_server_workers_applies_the_rest_and_warns_naming_the_key() {
    let upstream = Upstream::start("u1");
    let mut gateway = GatewayProcess::builder().workers(1).start(&api(&[&upstream]));
    let health_url = gateway.url("/health");

    let toml = format!("{}{}", api(&[&upstream]), route("extra", "/extra"));
    let text = gateway.config_text(&toml);
    assert!(text.contains("workers = 1\n"), "the builder writes workers: {text}");
    write_in_place(
        &gateway.settings_file(),
        &text.replace("workers = 1\n", "workers = 2\n"),
    );
    gateway.signal("HUP");

    wait_for_generation(&health_url, 2).await;
    assert_eq!(config_at(&health_url).await["last_reload_error"], Value::Null);
    assert_eq!(answered_by(&get(&gateway.url("/extra/1")).await), "u1");
    assert_eq!(answered_by(&get(&gateway.url("/api/1")).await), "u1");

    let log = gateway.stop_and_read_log();
    let warnings: Vec<&str> = log.lines().filter(|line| line.contains("WARN")).collect();
    assert!(
        warnings.iter().any(|line| line.contains("server.workers")),
        "a warning names server.workers:\n{log}"
    );
    assert!(
        !warnings.iter().any(|line| line.contains("server.listen")),
        "only changed keys are named:\n{log}"
    );
}

#[actix_web::test]
async fn a_reload_that_changes_server_listen_keeps_listening_where_it_was() {
    let upstream = Upstream::start("u1");
    let gateway = TestGateway::start(&api(&[&upstream]));
    let elsewhere = free_port();

    let toml = format!("{}{}", api(&[&upstream]), route("extra", "/extra"));
    let text = gateway.config_text(&toml);
    assert!(text.contains("listen = \"127.0.0.1:0\"\n"), "{text}");
    write_in_place(
        &gateway.settings_file(),
        &text.replace(
            "listen = \"127.0.0.1:0\"\n",
            &format!("listen = \"127.0.0.1:{elsewhere}\"\n"),
        ),
    );
    assert_eq!(gateway.reload().await, Ok(2), "the rest of the file applies");

    assert_eq!(answered_by(&get(&gateway.url("/extra/1")).await), "u1");
    assert_eq!(
        config_at(&gateway.url("/health")).await["last_reload_error"],
        Value::Null
    );
    assert!(
        TcpStream::connect(("127.0.0.1", elsewhere)).is_err(),
        "nothing listens on the new address before a restart"
    );
}

// ---------------------------------------------------------------------------
// 9. /metrics
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn metrics_count_reloads_by_result_and_show_the_generation() {
    let upstream = Upstream::start("u1");
    let gateway = GatewayProcess::start(&api(&[&upstream]), &[]);
    let (health_url, metrics_url) = (gateway.url("/health"), gateway.url("/metrics"));
    let file = gateway.settings_file();
    let text = scrape(&metrics_url).await;
    assert_eq!(sample(&text, "gatehouse_config_generation", &[]), Some(1.0), "{text}");

    let with_first = format!("{}{}", api(&[&upstream]), route("first", "/first"));
    write_in_place(&file, &gateway.config_text(&with_first));
    gateway.signal("HUP");
    wait_for_generation(&health_url, 2).await;

    let invalid = format!("{}strip_prefx = true\n", with_first);
    write_in_place(&file, &gateway.config_text(&invalid));
    gateway.signal("HUP");
    let refused = eventually(RELOAD_LIMIT, async || {
        !config_at(&health_url).await["last_reload_error"].is_null()
    })
    .await;
    assert!(refused, "the invalid file is refused");
    assert_eq!(generation_at(&health_url).await, 2);

    let with_second = format!("{}{}", api(&[&upstream]), route("second", "/second"));
    write_in_place(&file, &gateway.config_text(&with_second));
    gateway.signal("HUP");
    wait_for_generation(&health_url, 3).await;

    let text = scrape(&metrics_url).await;
    assert_eq!(sample(&text, "gatehouse_config_generation", &[]), Some(3.0), "{text}");
    assert_eq!(
        sample(&text, "gatehouse_config_reloads_total", &[("result", "success")]),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "gatehouse_config_reloads_total", &[("result", "failure")]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(answered_by(&get(&gateway.url("/second")).await), "u1");
}
