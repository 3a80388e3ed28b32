//! The real `gatehouse` binary (SPEC §1, §2, §5): `check-config`, the
//! configuration layers, validation, running on the shipped defaults,
//! graceful shutdown on SIGTERM / SIGINT, and the logs.
//!
//! Every command clears the variables of the caller's environment that the
//! binary reads, and sets `GATEHOUSE_SETTINGS_DIR` and `GATEHOUSE_ENV`
//! explicitly, so the results do not depend on the shell the tests run in.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::*;

/// A 40-byte HS secret.
const SECRET_40: &str = "s3cr3t-0123456789-abcdefghij-0123456789x";

/// `gatehouse check-config`, which must succeed; its stdout parsed as TOML.
fn effective(settings: &Path, environment: Option<&str>, vars: &[(&str, &str)]) -> toml::Table {
    effective_with_args(settings, environment, vars, &["check-config"])
}

fn effective_with_args(
    settings: &Path,
    environment: Option<&str>,
    vars: &[(&str, &str)],
    args: &[&str],
) -> toml::Table {
    let finished = run_gatehouse(settings, environment, vars, args);
    assert_eq!(
        finished.code,
        Some(0),
        "check-config with {vars:?} {args:?} failed: {}",
        finished.stderr
    );
    finished
        .stdout
        .parse()
        .unwrap_or_else(|err| panic!("check-config printed no valid TOML ({err}):\n{}", finished.stdout))
}

/// The value at a dotted path such as `services.user.instances`.
fn at<'a>(table: &'a toml::Table, path: &str) -> &'a toml::Value {
    let mut parts = path.split('.');
    let first = parts.next().unwrap();
    let mut value = table.get(first).unwrap_or_else(|| panic!("no {first} in {table}"));
    for part in parts {
        value = value
            .get(part)
            .unwrap_or_else(|| panic!("no {path} in the effective config:\n{table}"));
    }
    value
}

fn int_at(table: &toml::Table, path: &str) -> i64 {
    at(table, path)
        .as_integer()
        .unwrap_or_else(|| panic!("{path} is not an integer: {}", at(table, path)))
}

fn str_at<'a>(table: &'a toml::Table, path: &str) -> &'a str {
    at(table, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string: {}", at(table, path)))
}

fn strings_at(table: &toml::Table, path: &str) -> Vec<String> {
    at(table, path)
        .as_array()
        .unwrap_or_else(|| panic!("{path} is not an array: {}", at(table, path)))
        .iter()
        .map(|item| item.as_str().expect("a string item").to_owned())
        .collect()
}

/// A copy of the shipped `settings/*.toml` (never a developer's `local.toml`).
fn shipped_settings() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("settings");
    let mut copied = 0;
    for entry in std::fs::read_dir(&shipped).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name.ends_with(".toml") && name != "local.toml" {
            std::fs::copy(&path, dir.path().join(&name)).unwrap();
            copied += 1;
        }
    }
    assert!(copied >= 3, "default, development and production ship");
    dir
}

fn write(dir: &Path, name: &str, contents: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// Removes ANSI escape sequences (`ESC [ … final`).
fn strip_ansi(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        plain.push(c);
    }
    plain
}

// ---------------------------------------------------------------------------
// 1. check-config on the shipped settings; secrets are never printed
// ---------------------------------------------------------------------------

#[test]
fn check_config_prints_the_shipped_effective_config_as_toml() {
    let settings = shipped_settings();
    let finished = run_gatehouse(settings.path(), Some("development"), &[], &["check-config"]);
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
    let config: toml::Table = finished.stdout.parse().expect("stdout is TOML");

    assert_eq!(str_at(&config, "server.listen"), "127.0.0.1:8080");
    assert_eq!(int_at(&config, "server.shutdown_timeout_s"), 30);
    assert_eq!(int_at(&config, "health.interval_ms"), 10_000);
    assert_eq!(str_at(&config, "rate_limit.backend"), "memory");
    assert_eq!(str_at(&config, "rate_limit.global"), "default");
    assert_eq!(int_at(&config, "rate_limit.policies.default.max"), 100);
    assert_eq!(int_at(&config, "rate_limit.policies.users.max"), 50);
    assert_eq!(int_at(&config, "rate_limit.policies.admin.max"), 200);
    for (service, port) in [("user", 3001), ("product", 3002), ("order", 3003), ("admin", 3004)] {
        assert_eq!(
            strings_at(&config, &format!("services.{service}.instances")),
            vec![format!("http://127.0.0.1:{port}")]
        );
    }
    for (route, prefix, service) in [
        ("users", "/api/users", "user"),
        ("products", "/api/products", "product"),
        ("orders", "/api/orders", "order"),
        ("admin", "/api/admin", "admin"),
    ] {
        assert_eq!(str_at(&config, &format!("routes.{route}.prefix")), prefix);
        assert_eq!(str_at(&config, &format!("routes.{route}.service")), service);
    }
    assert_eq!(at(&config, "routes.users.auth").as_bool(), Some(true));
    assert_eq!(at(&config, "routes.products.auth").as_bool(), Some(false));
    assert_eq!(strings_at(&config, "routes.admin.roles"), vec!["admin"]);
    assert_eq!(str_at(&config, "routes.admin.rate_limit"), "admin");

    // The development secret is set, but not printed.
    let secret = str_at(&config, "auth.jwt_secret");
    assert!(!secret.is_empty(), "the development layer sets a secret");
    assert!(
        !finished.both().contains("dev-only-insecure-secret"),
        "the development secret was printed:\n{}",
        finished.both()
    );
}

#[test]
fn check_config_never_prints_secrets() {
    let settings = shipped_settings();
    let finished = run_gatehouse(
        settings.path(),
        Some("development"),
        &[
            ("JWT_SECRET", SECRET_40),
            ("GATEHOUSE__RATE_LIMIT__REDIS_URL", "redis://:hunter2@127.0.0.1:6390/0"),
        ],
        &["check-config"],
    );
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
    for secret in [SECRET_40, "hunter2"] {
        assert!(
            !finished.both().contains(secret),
            "{secret:?} was printed:\n{}",
            finished.both()
        );
    }
    let config: toml::Table = finished.stdout.parse().unwrap();
    let redis_url = str_at(&config, "rate_limit.redis_url");
    assert!(
        redis_url.starts_with("redis://") && redis_url.contains("127.0.0.1:6390/0"),
        "everything but the password is shown: {redis_url}"
    );
    assert!(!str_at(&config, "auth.jwt_secret").is_empty());

    // A user name and password given through REDIS_URL, and the secret
    // through the structured variable.
    let finished = run_gatehouse(
        settings.path(),
        Some("production"),
        &[
            ("GATEHOUSE__AUTH__JWT_SECRET", SECRET_40),
            ("REDIS_URL", "redis://gate:hunter3@127.0.0.1:6391/1"),
        ],
        &["check-config"],
    );
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
    for secret in [SECRET_40, "hunter3"] {
        assert!(!finished.both().contains(secret), "{}", finished.both());
    }

    // Nor when the configuration is refused.
    let finished = run_gatehouse(
        settings.path(),
        Some("production"),
        &[
            ("JWT_SECRET", SECRET_40),
            ("GATEHOUSE__RATE_LIMIT__REDIS_URL", "redis://:hunter2@127.0.0.1:6390/0"),
            ("GATEHOUSE__ROUTES__PRODUCTS__SERVICE", "nope"),
        ],
        &["check-config"],
    );
    assert_eq!(finished.code, Some(1));
    assert!(finished.stderr.contains("routes.products.service"));
    for secret in [SECRET_40, "hunter2"] {
        assert!(!finished.both().contains(secret), "{}", finished.both());
    }
}

// ---------------------------------------------------------------------------
// 2. Layers, later wins
// ---------------------------------------------------------------------------

/// A settings directory where each layer sets the health keys to its own
/// number: default 1, `{GATEHOUSE_ENV}` 2, local 3, `--config` 4.
struct Layered {
    dir: tempfile::TempDir,
    config_file: String,
}

fn layered() -> Layered {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "default.toml",
        r#"
[server]
listen = "127.0.0.1:1001"
workers = 1

[health]
interval_ms = 1
timeout_ms = 1
unhealthy_threshold = 1
healthy_threshold = 1
passive_failures = 1

[services.user]
instances = ["http://127.0.0.1:3001"]
[services.product]
instances = ["http://127.0.0.1:3002"]
[services.order]
instances = ["http://127.0.0.1:3003"]

[routes.products]
prefix = "/api/products"
service = "product"
"#,
    );
    write(
        dir.path(),
        "development.toml",
        "[health]\ninterval_ms = 2\ntimeout_ms = 2\nunhealthy_threshold = 2\nhealthy_threshold = 2\n",
    );
    write(
        dir.path(),
        "staging.toml",
        "[health]\ninterval_ms = 7\ntimeout_ms = 7\nunhealthy_threshold = 7\nhealthy_threshold = 7\n",
    );
    write(
        dir.path(),
        "local.toml",
        "[health]\ninterval_ms = 3\ntimeout_ms = 3\nunhealthy_threshold = 3\n",
    );
    let config_file = write(
        dir.path(),
        "extra-layer.toml",
        "[health]\ninterval_ms = 4\ntimeout_ms = 4\n[services.user]\ninstances = [\"http://127.0.0.1:4444\"]\n",
    );
    Layered {
        config_file: config_file.to_str().unwrap().to_owned(),
        dir,
    }
}

fn health_layers(config: &toml::Table) -> [i64; 5] {
    [
        int_at(config, "health.interval_ms"),
        int_at(config, "health.timeout_ms"),
        int_at(config, "health.unhealthy_threshold"),
        int_at(config, "health.healthy_threshold"),
        int_at(config, "health.passive_failures"),
    ]
}

#[test]
fn later_layers_win_default_env_file_local_config_file_variables() {
    let layers = layered();
    let dir = layers.dir.path();
    let file = layers.config_file.as_str();

    let config = effective_with_args(
        dir,
        Some("development"),
        &[("GATEHOUSE__HEALTH__INTERVAL_MS", "5")],
        &["--config", file, "check-config"],
    );
    assert_eq!(
        health_layers(&config),
        [5, 4, 3, 2, 1],
        "default < development.toml < local.toml < --config < GATEHOUSE__ variables"
    );

    // Without --config and variables, local.toml is the last word.
    let config = effective(dir, Some("development"), &[]);
    assert_eq!(health_layers(&config), [3, 3, 3, 2, 1]);

    // Without local.toml, the environment's file.
    std::fs::remove_file(dir.join("local.toml")).unwrap();
    let config = effective(dir, Some("development"), &[]);
    assert_eq!(health_layers(&config), [2, 2, 2, 2, 1]);
}

#[test]
fn gatehouse_env_picks_the_environment_file_and_defaults_to_development() {
    let layers = layered();
    let dir = layers.dir.path();
    let config = effective(dir, Some("staging"), &[]);
    assert_eq!(health_layers(&config), [3, 3, 3, 7, 1]);

    // Unset: development.
    let config = effective(dir, None, &[]);
    assert_eq!(health_layers(&config), [3, 3, 3, 2, 1]);

    // An environment without a file of its own is not an error.
    let config = effective(dir, Some("qa"), &[]);
    assert_eq!(health_layers(&config), [3, 3, 3, 1, 1]);
}

#[test]
fn config_is_accepted_before_and_after_the_subcommand() {
    let layers = layered();
    let dir = layers.dir.path();
    let file = layers.config_file.as_str();
    let before = effective_with_args(dir, Some("development"), &[], &["--config", file, "check-config"]);
    let after = effective_with_args(dir, Some("development"), &[], &["check-config", "--config", file]);
    assert_eq!(before, after);
    assert_eq!(health_layers(&after), [4, 4, 3, 2, 1]);
    assert_eq!(
        strings_at(&after, "services.user.instances"),
        vec!["http://127.0.0.1:4444"]
    );

    // A --config file that does not exist is an error naming it.
    let finished = run_gatehouse(
        dir,
        Some("development"),
        &[],
        &["check-config", "--config", "/nonexistent/gatehouse-extra.toml"],
    );
    assert_eq!(finished.code, Some(1), "{finished:?}");
    assert!(
        finished.stderr.contains("/nonexistent/gatehouse-extra.toml"),
        "{}",
        finished.stderr
    );
}

#[test]
fn structured_variables_set_lists_numbers_booleans_and_addresses() {
    let layers = layered();
    let dir = layers.dir.path();
    let config = effective(
        dir,
        Some("development"),
        &[
            (
                "GATEHOUSE__SERVICES__USER__INSTANCES",
                "http://127.0.0.1:1,http://127.0.0.1:2",
            ),
            ("GATEHOUSE__SERVER__LISTEN", "127.0.0.1:9999"),
            ("GATEHOUSE__HEALTH__INTERVAL_MS", "1234"),
            ("GATEHOUSE__ROUTES__PRODUCTS__STRIP_PREFIX", "true"),
            ("GATEHOUSE__RATE_LIMIT__REDIS_URL", "redis://127.0.0.1:6390/2"),
        ],
    );
    assert_eq!(
        strings_at(&config, "services.user.instances"),
        vec!["http://127.0.0.1:1", "http://127.0.0.1:2"]
    );
    assert_eq!(str_at(&config, "server.listen"), "127.0.0.1:9999");
    assert_eq!(int_at(&config, "health.interval_ms"), 1234);
    assert_eq!(at(&config, "routes.products.strip_prefix").as_bool(), Some(true));
    assert_eq!(str_at(&config, "rate_limit.redis_url"), "redis://127.0.0.1:6390/2");
    // Keys not named by a variable keep their file values.
    assert_eq!(str_at(&config, "routes.products.prefix"), "/api/products");
    assert_eq!(int_at(&config, "server.workers"), 1);
}

#[test]
fn a_misspelt_variable_is_an_error_naming_the_key() {
    let layers = layered();
    let finished = run_gatehouse(
        layers.dir.path(),
        Some("development"),
        &[("GATEHOUSE__SERVER__LISTN", "127.0.0.1:9999")],
        &["check-config"],
    );
    assert_eq!(finished.code, Some(1), "{finished:?}");
    assert!(finished.stderr.contains("server.listn"), "{}", finished.stderr);
}

#[test]
fn the_seed_variables_work() {
    let layers = layered();
    let dir = layers.dir.path();
    let file = layers.config_file.as_str();
    let config = effective_with_args(
        dir,
        Some("development"),
        &[
            ("USER_SERVICE_URL", "http://127.0.0.1:5001,http://127.0.0.1:5002"),
            ("PRODUCT_SERVICE_URL", "http://127.0.0.1:5003"),
            ("ORDER_SERVICE_URL", "http://127.0.0.1:5004"),
            ("REDIS_URL", "redis://127.0.0.1:6399/3"),
            ("JWT_SECRET", SECRET_40),
        ],
        // The seed variables also beat the --config file.
        &["--config", file, "check-config"],
    );
    assert_eq!(
        strings_at(&config, "services.user.instances"),
        vec!["http://127.0.0.1:5001", "http://127.0.0.1:5002"]
    );
    assert_eq!(
        strings_at(&config, "services.product.instances"),
        vec!["http://127.0.0.1:5003"]
    );
    assert_eq!(
        strings_at(&config, "services.order.instances"),
        vec!["http://127.0.0.1:5004"]
    );
    assert_eq!(str_at(&config, "rate_limit.redis_url"), "redis://127.0.0.1:6399/3");
    assert!(
        !str_at(&config, "auth.jwt_secret").is_empty(),
        "JWT_SECRET sets auth.jwt_secret"
    );

    // Without JWT_SECRET the secret is empty here; a short one is refused by name.
    let config = effective(dir, Some("development"), &[]);
    assert_eq!(str_at(&config, "auth.jwt_secret"), "");
    let finished = run_gatehouse(dir, Some("development"), &[("JWT_SECRET", "short")], &["check-config"]);
    assert_eq!(finished.code, Some(1), "{finished:?}");
    assert!(finished.stderr.contains("auth.jwt_secret"), "{}", finished.stderr);
}

#[test]
fn a_structured_variable_beats_the_seed_variable_for_the_same_key() {
    let layers = layered();
    let dir = layers.dir.path();
    let config = effective(
        dir,
        Some("development"),
        &[
            ("USER_SERVICE_URL", "http://127.0.0.1:5001"),
            (
                "GATEHOUSE__SERVICES__USER__INSTANCES",
                "http://127.0.0.1:6001,http://127.0.0.1:6002",
            ),
            ("REDIS_URL", "redis://127.0.0.1:6399/3"),
            ("GATEHOUSE__RATE_LIMIT__REDIS_URL", "redis://127.0.0.1:6400/4"),
        ],
    );
    assert_eq!(
        strings_at(&config, "services.user.instances"),
        vec!["http://127.0.0.1:6001", "http://127.0.0.1:6002"]
    );
    assert_eq!(str_at(&config, "rate_limit.redis_url"), "redis://127.0.0.1:6400/4");

    // A short JWT_SECRET loses to a long GATEHOUSE__AUTH__JWT_SECRET.
    let finished = run_gatehouse(
        dir,
        Some("development"),
        &[("JWT_SECRET", "short"), ("GATEHOUSE__AUTH__JWT_SECRET", SECRET_40)],
        &["check-config"],
    );
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
}

// ---------------------------------------------------------------------------
// 3. Validation: exit 1, the key named; serve refuses alike
// ---------------------------------------------------------------------------

/// A settings directory whose `default.toml` is `toml`, listening on a free
/// port should it ever start.
fn settings_file(toml: &str) -> tempfile::TempDir {
    let port = free_port();
    settings_dir(&format!("[server]\nlisten = \"127.0.0.1:{port}\"\nworkers = 1\n{toml}"))
}

const ONE_SERVICE: &str = r#"
[services.user]
instances = ["http://127.0.0.1:3001"]
"#;

/// Runs `serve`, the bare binary and check-config on `dir`; each must exit 1
/// with every `expected` text on stderr.
fn refused(dir: &Path, environment: &str, vars: &[(&str, &str)], expected: &[&str]) {
    for args in [&["serve"][..], &[][..], &["check-config"][..]] {
        let finished = run_gatehouse(dir, Some(environment), vars, args);
        assert_eq!(
            finished.code,
            Some(1),
            "gatehouse {args:?} should refuse the config; stderr: {}",
            finished.stderr
        );
        for text in expected {
            assert!(
                finished.stderr.contains(text),
                "gatehouse {args:?}: stderr lacks {text:?}:\n{}",
                finished.stderr
            );
        }
        assert!(
            finished.stdout.trim().is_empty(),
            "nothing on stdout when refused: {}",
            finished.stdout
        );
    }
}

#[test]
fn an_unknown_key_is_refused_by_name() {
    let dir = settings_file(&format!(
        "listn = \"127.0.0.1:1\"\n{ONE_SERVICE}[routes.users]\nprefix = \"/api/users\"\nservice = \"user\"\n"
    ));
    refused(dir.path(), "test", &[], &["server.listn"]);

    let dir = settings_file(&format!(
        "{ONE_SERVICE}[routes.users]\nprefix = \"/api/users\"\nservice = \"user\"\nrate_limt = \"x\"\n"
    ));
    refused(dir.path(), "test", &[], &["routes.users.rate_limt"]);
}

#[test]
fn a_route_to_a_missing_service_is_refused_by_name() {
    let dir = settings_file(&format!(
        "{ONE_SERVICE}[routes.users]\nprefix = \"/api/users\"\nservice = \"usr\"\n"
    ));
    refused(
        dir.path(),
        "test",
        &[],
        &["routes.users.service: no service named \"usr\""],
    );
}

#[test]
fn a_route_under_the_reserved_paths_is_refused_by_name() {
    for prefix in ["/health", "/metrics/x", "/metrics", "/health/deep"] {
        let dir = settings_file(&format!(
            "{ONE_SERVICE}[routes.own]\nprefix = \"{prefix}\"\nservice = \"user\"\n"
        ));
        refused(dir.path(), "test", &[], &["routes.own.prefix", "reserved"]);
    }
    // A broader prefix is allowed.
    let dir = settings_file(&format!(
        "{ONE_SERVICE}[routes.all]\nprefix = \"/\"\nservice = \"user\"\n"
    ));
    let finished = run_gatehouse(dir.path(), Some("test"), &[], &["check-config"]);
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
}

#[test]
fn an_instance_that_is_not_an_absolute_http_url_is_refused_by_name() {
    for url in ["ftp://127.0.0.1:21", "127.0.0.1:3001", "/relative", "localhost"] {
        let dir = settings_file(&format!(
            "[services.x]\ninstances = [\"{url}\"]\n[routes.x]\nprefix = \"/x\"\nservice = \"x\"\n"
        ));
        refused(dir.path(), "test", &[], &["services.x.instances"]);
    }
    // Also through a variable.
    let dir = settings_file(&format!(
        "[services.x]\ninstances = [\"http://127.0.0.1:1\"]\n{ONE_SERVICE}"
    ));
    refused(
        dir.path(),
        "test",
        &[("GATEHOUSE__SERVICES__X__INSTANCES", "http://127.0.0.1:1,nope")],
        &["services.x.instances"],
    );
}

#[test]
fn a_route_naming_a_missing_policy_is_refused_by_name() {
    let dir = settings_file(&format!(
        "{ONE_SERVICE}[rate_limit.policies.users]\nwindow_s = 60\nmax = 5\n[routes.users]\nprefix = \"/api/users\"\nservice = \"user\"\nrate_limit = \"nope\"\n"
    ));
    refused(dir.path(), "test", &[], &["routes.users.rate_limit", "\"nope\""]);
}

#[test]
fn an_auth_route_without_a_secret_in_production_is_refused_by_name() {
    // The shipped settings: production sets no secret.
    let settings = shipped_settings();
    refused(
        settings.path(),
        "production",
        &[("GATEHOUSE__SERVER__LISTEN", &format!("127.0.0.1:{}", free_port()))],
        &["auth.jwt_secret"],
    );
    // With one, production is fine.
    let finished = run_gatehouse(
        settings.path(),
        Some("production"),
        &[("JWT_SECRET", SECRET_40)],
        &["check-config"],
    );
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);

    // A file of our own.
    let dir = settings_file(&format!(
        "{ONE_SERVICE}[routes.users]\nprefix = \"/api/users\"\nservice = \"user\"\nauth = true\n"
    ));
    refused(dir.path(), "production", &[], &["auth.jwt_secret"]);
    // roles imply auth.
    let dir = settings_file(&format!(
        "{ONE_SERVICE}[routes.users]\nprefix = \"/api/users\"\nservice = \"user\"\nroles = [\"admin\"]\n"
    ));
    refused(dir.path(), "production", &[], &["auth.jwt_secret"]);
    // A secret shorter than 32 bytes.
    refused(
        dir.path(),
        "production",
        &[("JWT_SECRET", "0123456789abcdef0123456789abcde")],
        &["auth.jwt_secret"],
    );
}

fn rs256_route(public_key_pem: Option<&str>) -> tempfile::TempDir {
    let key = public_key_pem
        .map(|path| format!("public_key_pem = {path:?}\n"))
        .unwrap_or_default();
    settings_file(&format!(
        "[auth]\nalgorithms = [\"RS256\"]\n{key}{ONE_SERVICE}[routes.users]\nprefix = \"/api/users\"\nservice = \"user\"\nauth = true\n"
    ))
}

#[test]
fn rs256_without_a_public_key_is_refused_by_name() {
    let dir = rs256_route(None);
    refused(dir.path(), "test", &[], &["auth.public_key_pem"]);
    let dir = rs256_route(Some("/nonexistent/gatehouse-key.pem"));
    refused(dir.path(), "test", &[], &["auth.public_key_pem"]);
}

#[test]
fn rs256_with_a_directory_as_public_key_is_refused_by_name() {
    let key_dir = tempfile::tempdir().unwrap();
    let dir = rs256_route(Some(key_dir.path().to_str().unwrap()));
    refused(dir.path(), "test", &[], &["auth.public_key_pem"]);
}

#[test]
fn rs256_with_a_file_that_is_not_a_key_is_refused_by_check_config_as_by_serve() {
    let key_dir = tempfile::tempdir().unwrap();
    let key = write(key_dir.path(), "public.pem", "not a key\n");
    let dir = rs256_route(Some(key.to_str().unwrap()));
    refused(dir.path(), "test", &[], &["auth.public_key_pem"]);
}

#[test]
fn every_problem_in_a_file_is_reported_at_once() {
    let dir = settings_file(
        r#"
[services.user]
instances = ["http://127.0.0.1:3001"]
[services.x]
instances = ["ftp://127.0.0.1:21"]

[routes.users]
prefix = "/api/users"
service = "usr"

[routes.own]
prefix = "/metrics/x"
service = "user"

[routes.limited]
prefix = "/limited"
service = "user"
rate_limit = "nope"

[health]
interval_ms = 0
"#,
    );
    refused(
        dir.path(),
        "test",
        &[],
        &[
            "routes.users.service: no service named \"usr\"",
            "routes.own.prefix",
            "services.x.instances",
            "routes.limited.rate_limit",
            "health.interval_ms",
        ],
    );
}

#[test]
fn unreadable_values_unknown_keys_and_missing_keys_are_reported_together() {
    // serde stops at the first error; every one of these must still be named.
    let dir = settings_file(&format!(
        "{ONE_SERVICE}[health]\ninterval_ms = \"soon\"\n[routs.users]\nprefix = \"/x\"\n\
         [rate_limit.policies.p]\nwindow_s = 60\n[routes.users]\nprefix = \"/api/users\"\nservice = \"user\"\n"
    ));
    refused(
        dir.path(),
        "test",
        &[("GATEHOUSE__SERVER__WORKERS", "abc")],
        &[
            "server.workers: invalid type: string \"abc\", expected an integer \
             (from the environment variable GATEHOUSE__SERVER__WORKERS)",
            "health.interval_ms: invalid type: string \"soon\", expected an integer (from ",
            "routs: unknown key",
            "rate_limit.policies.p.max: required key is missing",
        ],
    );
    let finished = run_gatehouse(
        dir.path(),
        Some("test"),
        &[("GATEHOUSE__SERVER__WORKERS", "abc")],
        &["check-config"],
    );
    let line = |key: &str| {
        finished
            .stderr
            .lines()
            .find(|line| line.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("no line for {key}: {}", finished.stderr))
            .to_owned()
    };
    assert!(
        line("health.interval_ms").ends_with("default.toml)"),
        "{}",
        finished.stderr
    );
    assert!(!line("server.workers").contains("default.toml"), "{}", finished.stderr);
}

#[test]
fn an_unknown_algorithm_is_refused_with_the_valid_names() {
    let dir = settings_file(&format!(
        "[auth]\nalgorithms = [\"HS999\"]\n{ONE_SERVICE}[routes.users]\nprefix = \"/api/users\"\nservice = \"user\"\n"
    ));
    refused(
        dir.path(),
        "test",
        &[],
        &[
            "auth.algorithms: unknown algorithm \"HS999\"; expected one of HS256, HS384, HS512, RS256, RS384, \
           RS512, PS256, PS384, PS512, ES256, ES384, EdDSA",
        ],
    );
}

// ---------------------------------------------------------------------------
// 4. The shipped defaults run with no other service
// ---------------------------------------------------------------------------

/// A `gatehouse` process started by these tests, stderr piped.
struct Spawned {
    child: Child,
    address: SocketAddr,
}

impl Spawned {
    fn start(mut command: Command, address: SocketAddr) -> Self {
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the gatehouse binary starts");
        let mut spawned = Self { child, address };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(address).is_err() {
            if let Some(status) = spawned.child.try_wait().unwrap() {
                panic!(
                    "gatehouse exited ({status}) before listening: {}",
                    spawned.stop_and_read_stderr()
                );
            }
            assert!(Instant::now() < deadline, "gatehouse did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        spawned
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// SIGTERM, then SIGKILL after 10 s; returns everything on stderr.
    fn stop_and_read_stderr(&mut self) -> String {
        if self.child.try_wait().unwrap().is_none() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            use std::io::Read;
            let _ = pipe.read_to_string(&mut stderr);
        }
        stderr
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[actix_web::test]
async fn the_shipped_defaults_run_with_no_other_service() {
    let settings = shipped_settings();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut command = gatehouse_command(settings.path(), Some("development"));
    command.env("GATEHOUSE__SERVER__LISTEN", &listen);
    // The shipped instance ports may be taken by something else on this
    // machine (a demo, another test run): point those at closed ports so that
    // "no other service" holds.
    for (var, seed_port) in [
        ("USER_SERVICE_URL", 3001),
        ("PRODUCT_SERVICE_URL", 3002),
        ("ORDER_SERVICE_URL", 3003),
        ("ADMIN_SERVICE_URL", 3004),
    ] {
        if TcpStream::connect(("127.0.0.1", seed_port)).is_ok() {
            command.env(var, closed_port_url());
        }
    }
    let mut gateway = Spawned::start(command, listen.parse().unwrap());

    let reply = get(&gateway.url("/health")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let health = reply.json();
    for service in ["user", "product", "order", "admin"] {
        assert!(health["services"][service]["instances"].is_array(), "{health}");
    }

    for _ in 0..3 {
        let reply = get(&gateway.url("/api/products")).await;
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(
            reply.json(),
            serde_json::json!({"error": "Service unavailable", "service": "product"})
        );
    }

    // Once a probe or the passive failures marked the instances down.
    let mut last = serde_json::Value::Null;
    let down = eventually(Duration::from_secs(15), async || {
        let reply = get(&gateway.url("/health")).await;
        assert_eq!(reply.status, 200);
        last = reply.json();
        matches!(last["status"].as_str(), Some("down" | "degraded"))
    })
    .await;
    assert!(down, "/health never reported down or degraded: {last}");
    assert_eq!(last["services"]["product"]["status"], "unhealthy", "{last}");

    let stderr = strip_ansi(&gateway.stop_and_read_stderr());
    assert!(
        stderr
            .lines()
            .any(|line| line.contains("WARN") && line.contains("development") && line.contains("secret")),
        "no warning about the development secret:\n{stderr}"
    );
    assert!(
        !stderr.contains("dev-only-insecure-secret"),
        "the development secret itself was logged:\n{stderr}"
    );
}

#[actix_web::test]
async fn serve_takes_config_before_and_after_the_subcommand() {
    let upstream = Upstream::start("product");
    let dir = settings_file(&format!(
        "[services.product]\ninstances = {}\n[routes.products]\nprefix = \"/api/products\"\nservice = \"product\"\n",
        instances(&[&upstream])
    ));
    for before in [true, false] {
        let port = free_port();
        let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let extra = write(dir.path(), "extra.toml", &format!("[server]\nlisten = \"{address}\"\n"));
        let extra = extra.to_str().unwrap();
        let mut command = gatehouse_command(dir.path(), Some("test"));
        if before {
            command.args(["--config", extra]);
        } else {
            command.args(["serve", "--config", extra]);
        }
        let mut gateway = Spawned::start(command, address);
        let reply = get(&gateway.url("/api/products/1")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["instance"], "product");
        gateway.stop_and_read_stderr();
    }
}

#[test]
fn serve_exits_1_naming_server_listen_when_the_port_is_taken() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap();
    let dir = settings_file(ONE_SERVICE);
    let finished = run_gatehouse(
        dir.path(),
        Some("test"),
        &[("GATEHOUSE__SERVER__LISTEN", &address.to_string())],
        &["serve"],
    );
    assert_eq!(finished.code, Some(1), "{finished:?}");
    assert!(finished.stderr.contains("server.listen"), "{}", finished.stderr);
    drop(taken);
}

// ---------------------------------------------------------------------------
// 5. Graceful shutdown
// ---------------------------------------------------------------------------

fn slow_gateway(upstream: &Upstream, env: &[(&str, &str)]) -> GatewayProcess {
    GatewayProcess::start(
        &format!(
            "[services.slow]\ninstances = {}\n[routes.api]\nprefix = \"/api\"\nservice = \"slow\"\n",
            instances(&[upstream])
        ),
        env,
    )
}

/// Sends `GET path` on its own thread; the raw response once the gateway
/// closes the connection.
fn request_in_background(address: SocketAddr, path: &str) -> std::thread::JoinHandle<(String, Duration)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n");
    std::thread::spawn(move || {
        let started = Instant::now();
        let response = raw_exchange(address, request.as_bytes(), Duration::from_secs(30));
        (response, started.elapsed())
    })
}

/// Waits until the upstream has received `hits` requests.
fn wait_for_hits(upstream: &Upstream, hits: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream.hits() < hits {
        assert!(Instant::now() < deadline, "the request never reached the upstream");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn drains_in_flight_requests_on(signal: &str) {
    let upstream = Upstream::start("slow");
    let mut gateway = slow_gateway(&upstream, &[]);
    let in_flight = request_in_background(gateway.address, "/api/slow/1500");
    wait_for_hits(&upstream, 1);
    std::thread::sleep(Duration::from_millis(300));

    gateway.signal(signal);
    let signalled = Instant::now();

    // New connections are refused while the in-flight request drains.
    let mut refused = false;
    while signalled.elapsed() < Duration::from_millis(800) {
        match TcpStream::connect_timeout(&gateway.address, Duration::from_millis(200)) {
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => {
                refused = true;
                break;
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    assert!(
        refused,
        "SIG{signal}: new connections were still accepted {:?} after the signal",
        signalled.elapsed()
    );
    assert!(!in_flight.is_finished(), "the in-flight request ended before the check");

    let (response, _) = in_flight.join().unwrap();
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "SIG{signal}: the in-flight request did not complete: {response:?}"
    );
    assert!(response.contains("\"instance\":\"slow\""), "{response}");

    let code = gateway.wait_exit(Duration::from_secs(10));
    assert_eq!(
        code,
        Some(0),
        "SIG{signal}: gatehouse should exit 0 once drained (waited {:?})",
        signalled.elapsed()
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "the drain should end with the last request, not at shutdown_timeout_s"
    );
}

#[test]
fn sigterm_drains_in_flight_requests_and_exits_0() {
    drains_in_flight_requests_on("TERM");
}

#[test]
fn sigint_drains_in_flight_requests_and_exits_0() {
    drains_in_flight_requests_on("INT");
}

#[test]
fn the_drain_ends_at_shutdown_timeout_s() {
    let upstream = Upstream::start("slow");
    let mut gateway = slow_gateway(&upstream, &[("GATEHOUSE__SERVER__SHUTDOWN_TIMEOUT_S", "1")]);
    let in_flight = request_in_background(gateway.address, "/api/slow/5000");
    wait_for_hits(&upstream, 1);
    std::thread::sleep(Duration::from_millis(300));

    gateway.signal("TERM");
    let signalled = Instant::now();
    let code = gateway.wait_exit(Duration::from_secs(3));
    assert!(
        code.is_some(),
        "gatehouse still runs 3 s after SIGTERM with shutdown_timeout_s = 1"
    );
    assert_eq!(code, Some(0), "an orderly (if forced) stop exits 0");
    let (response, took) = in_flight.join().unwrap();
    assert!(
        !response.starts_with("HTTP/1.1 200"),
        "a 5 s request cannot have been served in full by a gateway that stopped: {response:?} after {took:?}"
    );
    assert!(signalled.elapsed() < Duration::from_secs(4));
}

// ---------------------------------------------------------------------------
// 6. Logs
// ---------------------------------------------------------------------------

fn logging_gateway(upstream: &Upstream, format: Option<&str>) -> (Spawned, tempfile::TempDir) {
    let port = free_port();
    let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let dir = settings_dir(&format!(
        "[server]\nlisten = \"{address}\"\nworkers = 1\n[services.product]\ninstances = {}\n[routes.products]\nprefix = \"/api/products\"\nservice = \"product\"\n",
        instances(&[upstream])
    ));
    let mut command = gatehouse_command(dir.path(), Some("test"));
    command.env("GATEHOUSE_LOG", "info");
    if let Some(format) = format {
        command.env("GATEHOUSE_LOG_FORMAT", format);
    }
    (Spawned::start(command, address), dir)
}

async fn get_with_request_id(url: &str, request_id: &str) -> Reply {
    let response = client()
        .get(url)
        .insert_header(("x-request-id", request_id))
        .send()
        .await
        .expect("request reaches the gateway");
    read_reply(response).await
}

#[actix_web::test]
async fn json_logs_carry_status_latency_request_id_route_and_instance() {
    let upstream = Upstream::start("product");
    let (mut gateway, _dir) = logging_gateway(&upstream, Some("json"));
    let reply = get_with_request_id(&gateway.url("/api/products/1"), "log-test-1").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-request-id"), Some("log-test-1"));
    let stderr = gateway.stop_and_read_stderr();

    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not a JSON line ({err}): {line:?}\n{stderr}"))
        })
        .collect();
    assert!(!lines.is_empty(), "no log lines at all");
    for line in &lines {
        assert!(line["level"].is_string() && line["timestamp"].is_string(), "{line}");
    }
    let completed = lines
        .iter()
        .find(|line| line["span"]["request_id"] == "log-test-1" && line["fields"]["status"].is_number())
        .unwrap_or_else(|| panic!("no line with the request id and a status:\n{stderr}"));
    assert_eq!(completed["fields"]["status"], 200, "{completed}");
    assert!(
        completed["fields"]["latency_ms"].is_number(),
        "a latency field: {completed}"
    );
    assert_eq!(completed["span"]["route"], "products", "{completed}");
    assert_eq!(completed["span"]["instance"], upstream.url().as_str(), "{completed}");
}

#[actix_web::test]
async fn text_logs_name_the_request_id() {
    let upstream = Upstream::start("product");
    let (mut gateway, _dir) = logging_gateway(&upstream, None);
    let reply = get_with_request_id(&gateway.url("/api/products/2"), "log-test-2").await;
    assert_eq!(reply.status, 200);
    let stderr = gateway.stop_and_read_stderr();

    assert!(
        serde_json::from_str::<serde_json::Value>(stderr.lines().next().unwrap_or("")).is_err(),
        "text, not JSON:\n{stderr}"
    );
    let plain = strip_ansi(&stderr);
    let line = plain
        .lines()
        .find(|line| line.contains("request_id=log-test-2") && line.contains("200"))
        .unwrap_or_else(|| panic!("no completion line for log-test-2:\n{plain}"));
    assert!(line.contains("products"), "the route is named: {line}");
    assert!(
        stderr.contains("request_id=log-test-2"),
        "stderr is a pipe, not a terminal: the lines must be plain text, \
         without ANSI colour codes, so that `request_id=log-test-2` can be found \
         as written; got {:?}",
        stderr
            .lines()
            .find(|line| line.contains("log-test-2"))
            .unwrap_or_default()
    );
}

#[actix_web::test]
async fn serve_logs_never_print_secrets() {
    let upstream = Upstream::start("product");
    let port = free_port();
    let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let dir = settings_dir(&format!(
        "[server]\nlisten = \"{address}\"\nworkers = 1\n[services.product]\ninstances = {}\n[routes.products]\nprefix = \"/api/products\"\nservice = \"product\"\nauth = true\n",
        instances(&[&upstream])
    ));
    let mut command = gatehouse_command(dir.path(), Some("test"));
    command
        .env("GATEHOUSE_LOG", "debug")
        .env("JWT_SECRET", SECRET_40)
        .env("GATEHOUSE__RATE_LIMIT__REDIS_URL", "redis://:hunter2@127.0.0.1:6390/0");
    let mut gateway = Spawned::start(command, address);
    let reply = read_reply(
        client()
            .get(gateway.url("/api/products"))
            .insert_header(("authorization", "Bearer not-a-token"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(reply.status >= 400, "{}", reply.status);
    let stderr = gateway.stop_and_read_stderr();
    assert!(!stderr.is_empty());
    for secret in [SECRET_40, "hunter2"] {
        assert!(!stderr.contains(secret), "{secret:?} was logged:\n{stderr}");
    }
}
