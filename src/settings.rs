//! Typed, layered and validated configuration (SPEC §2).
//!
//! Layers, later wins: `settings/default.toml`, `settings/{GATEHOUSE_ENV}.toml`,
//! `settings/local.toml`, the `--config` file, the seed's own variables
//! (`JWT_SECRET`, `REDIS_URL`, `USER_SERVICE_URL`, …) and `GATEHOUSE__SECTION__KEY`
//! variables. Unknown keys are errors, and loading reports every problem at
//! once, each line naming its key, so a typo can never silently disable a limit:
//! a value that cannot be read (wrong type, missing required key) is reported,
//! taken out of the merged tree and the rest read again, so one bad entry hides
//! neither the others nor the validation of what does not depend on it. Every
//! value keeps its origin (a file, or the environment variable that set it), and
//! a problem with a value from the environment names its variable.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use jsonwebtoken::Algorithm;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::routing;

/// Prefix of the structured environment overrides: `GATEHOUSE__SERVER__LISTEN`.
const ENV_PREFIX: &str = "GATEHOUSE";
/// The seed's variables naming one service's instances (comma-separated).
const SEED_SERVICE_VARS: [(&str, &str); 4] = [
    ("USER_SERVICE_URL", "user"),
    ("PRODUCT_SERVICE_URL", "product"),
    ("ORDER_SERVICE_URL", "order"),
    ("ADMIN_SERVICE_URL", "admin"),
];
/// Paths answered by the gateway itself; no route may shadow them.
pub const RESERVED_PATHS: [&str; 2] = ["/health", "/metrics"];
/// Marker printed in place of a secret.
const REDACTED: &str = "<redacted>";
/// An HS secret shorter than this is refused for routes that need auth.
pub const MIN_HS_SECRET_BYTES: usize = 32;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub server: ServerSettings,
    pub upstream: UpstreamSettings,
    pub health: HealthSettings,
    pub auth: AuthSettings,
    pub rate_limit: RateLimitSettings,
    pub services: BTreeMap<String, ServiceSettings>,
    pub routes: BTreeMap<String, RouteSettings>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerSettings {
    /// `None` (`""` in the files): no plain listener, TLS only.
    #[serde(with = "optional_address")]
    pub listen: Option<SocketAddr>,
    /// 0 = one worker per CPU core.
    pub workers: usize,
    pub max_body_bytes: u64,
    pub max_header_bytes: usize,
    pub client_request_timeout_ms: u64,
    pub shutdown_timeout_s: u64,
    #[serde(deserialize_with = "list_or_csv")]
    pub trusted_proxies: Vec<IpNet>,
    /// Reload when a settings file changes, as well as on SIGHUP (SPEC §7).
    pub watch_config: bool,
    pub tls: TlsSettings,
}

/// The TLS listener (SPEC §8).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TlsSettings {
    /// `None` (`""`): no TLS listener.
    #[serde(with = "optional_address")]
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain, leaf first.
    pub cert_file: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
}

/// A listen address that may be `""` for none.
mod optional_address {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(address: &Option<SocketAddr>, serializer: S) -> Result<S::Ok, S::Error> {
        match address {
            Some(address) => serializer.collect_str(address),
            None => serializer.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.trim() {
            "" => Ok(None),
            address => address.parse().map(Some).map_err(serde::de::Error::custom),
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            workers: 0,
            max_body_bytes: 10 * 1024 * 1024,
            max_header_bytes: 32 * 1024,
            client_request_timeout_ms: 5000,
            shutdown_timeout_s: 30,
            trusted_proxies: Vec::new(),
            watch_config: false,
            tls: TlsSettings::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpstreamSettings {
    pub connect_timeout_ms: u64,
    pub request_timeout_ms: u64,
    /// An upstream body silent this long is cut; 0 = never.
    pub body_idle_timeout_ms: u64,
    pub max_connections_per_host: usize,
    /// Extra PEM CA bundle for `https://` instances, beside the public web
    /// roots; `""` for none.
    pub ca_file: String,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 1000,
            request_timeout_ms: 30_000,
            body_idle_timeout_ms: 60_000,
            max_connections_per_host: 256,
            ca_file: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HealthSettings {
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    pub passive_failures: u32,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            interval_ms: 10_000,
            timeout_ms: 2000,
            unhealthy_threshold: 2,
            healthy_threshold: 1,
            passive_failures: 3,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuthSettings {
    pub jwt_secret: Secret,
    pub public_key_pem: String,
    #[serde(deserialize_with = "algorithm_list")]
    pub algorithms: Vec<Algorithm>,
    pub issuer: String,
    pub audience: String,
    pub leeway_s: u64,
    pub roles_claim: String,
    /// An identity provider's JSON Web Key Set (SPEC §11); `""` for none.
    pub jwks_url: String,
    /// How often the set is fetched again.
    pub jwks_refresh_s: u64,
    /// Fetches (an unknown `kid`'s refetch included) are at least this far
    /// apart.
    pub jwks_min_refetch_s: u64,
}

impl AuthSettings {
    /// The one rule for HMAC keys: an HS algorithm needs a secret. Checked
    /// by validation (for routes that need auth) and by the verifier itself.
    pub fn missing_secret(&self) -> Option<String> {
        let hmac = self.algorithms.iter().filter(|alg| is_hmac(**alg));
        (self.jwt_secret.is_empty() && hmac.clone().next().is_some()).then(|| {
            format!(
                "auth.jwt_secret: routes need auth with {} but no secret is set (JWT_SECRET or auth.jwt_secret, at least {MIN_HS_SECRET_BYTES} bytes)",
                algorithm_names(hmac)
            )
        })
    }
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            jwt_secret: Secret::default(),
            public_key_pem: String::new(),
            algorithms: vec![Algorithm::HS256],
            issuer: String::new(),
            audience: String::new(),
            leeway_s: 30,
            roles_claim: "role".to_owned(),
            jwks_url: String::new(),
            jwks_refresh_s: 300,
            jwks_min_refetch_s: 30,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitBackend {
    Memory,
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendErrorMode {
    /// Count in process while Redis is unreachable.
    Local,
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RateLimitSettings {
    pub backend: RateLimitBackend,
    pub redis_url: RedisUrl,
    /// Seed nodes of a Redis Cluster (SPEC §12): non-empty = cluster mode,
    /// `redis_url` unused.
    #[serde(deserialize_with = "list_or_csv")]
    pub redis_cluster: Vec<RedisUrl>,
    pub key_prefix: String,
    pub on_backend_error: BackendErrorMode,
    pub redis_timeout_ms: u64,
    /// Policy applied to every proxied or unmatched request; empty for none.
    pub global: String,
    pub policies: BTreeMap<String, PolicySettings>,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            backend: RateLimitBackend::Memory,
            redis_url: RedisUrl("redis://127.0.0.1:6379".to_owned()),
            redis_cluster: Vec::new(),
            key_prefix: "gatehouse:rl".to_owned(),
            on_backend_error: BackendErrorMode::Local,
            redis_timeout_ms: 250,
            global: String::new(),
            policies: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKey {
    /// The client address.
    Ip,
    /// The JWT `sub`; the client address when there is no token.
    User,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicySettings {
    pub window_s: u64,
    pub max: u64,
    #[serde(default = "default_policy_key")]
    pub key: PolicyKey,
    #[serde(default = "default_policy_message")]
    pub message: String,
    #[serde(default)]
    pub algorithm: LimitAlgorithm,
}

/// How a policy counts (SPEC §4, §12).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "String")]
pub enum LimitAlgorithm {
    /// Every admission's time, per key: exact, memory grows with `max`.
    #[default]
    SlidingLog,
    /// Two fixed-window counters per key, the previous one weighted by its
    /// overlap with the sliding window: constant memory, approximate.
    SlidingWindow,
}

impl TryFrom<String> for LimitAlgorithm {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        match name.as_str() {
            "sliding_log" => Ok(Self::SlidingLog),
            "sliding_window" => Ok(Self::SlidingWindow),
            _ => Err(format!(
                "unknown algorithm {name:?}; expected \"sliding_log\" or \"sliding_window\""
            )),
        }
    }
}

/// The Redis client reads options from a URL's fragment, `#insecure` (no
/// certificate verification) among them: refused.
const NO_FRAGMENT: &str = "must not have a #fragment (a TLS connection is always verified)";

/// Bounds on a policy, which keep every count and time (µs) well inside
/// what the Redis script's doubles and the gateway's integers hold.
pub const MAX_POLICY_MAX: u64 = 1_000_000_000;
pub const MAX_WINDOW_S: u64 = 366 * 24 * 3600;

/// Above this `max`, a `sliding_log` policy's memory per client is worth a
/// start-up warning (SPEC §12).
pub const LARGE_LOG_MAX: u64 = 10_000;

fn default_policy_key() -> PolicyKey {
    PolicyKey::Ip
}

fn default_policy_message() -> String {
    "Too many requests".to_owned()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceSettings {
    #[serde(deserialize_with = "list_or_csv")]
    pub instances: Vec<String>,
    #[serde(default = "default_health_path")]
    pub health_path: String,
}

fn default_health_path() -> String {
    "/health".to_owned()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteSettings {
    pub prefix: String,
    pub service: String,
    #[serde(default)]
    pub auth: bool,
    #[serde(default, deserialize_with = "list_or_csv")]
    pub roles: Vec<String>,
    #[serde(default, deserialize_with = "list_or_csv")]
    pub methods: Vec<String>,
    #[serde(default)]
    pub strip_prefix: bool,
    /// Send the client's `Host` upstream instead of the instance's.
    #[serde(default)]
    pub preserve_host: bool,
    /// Route and forward paths with `%2F` kept encoded instead of 400.
    #[serde(default)]
    pub allow_encoded_slash: bool,
    /// `false`: this route's responses get no helmet headers.
    #[serde(default = "default_true")]
    pub security_headers: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
    /// Host names this route answers for (exact, or `*.example.com`); empty
    /// for any host (SPEC §3 step 3).
    #[serde(default, deserialize_with = "list_or_csv")]
    pub hosts: Vec<String>,
    /// WebSocket upgrades are tunnelled on this route (SPEC §9).
    #[serde(default)]
    pub websocket: bool,
    /// This route's response-head timeout; 0 for `upstream.request_timeout_ms`.
    #[serde(default)]
    pub timeout_ms: u64,
    /// The route answers CORS itself (SPEC §10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<CorsSettings>,
}

/// `[routes.<name>.cors]` (SPEC §10).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CorsSettings {
    /// Origins as browsers send them (`https://app.example.com`), or `["*"]`.
    #[serde(default, deserialize_with = "list_or_csv")]
    pub allow_origins: Vec<String>,
    /// Empty: the route's `methods`, or every method an open route allows.
    #[serde(default, deserialize_with = "list_or_csv")]
    pub allow_methods: Vec<String>,
    /// Request headers a preflight may ask for; `["*"]` for any.
    #[serde(default, deserialize_with = "list_or_csv")]
    pub allow_headers: Vec<String>,
    #[serde(default, deserialize_with = "list_or_csv")]
    pub expose_headers: Vec<String>,
    #[serde(default)]
    pub allow_credentials: bool,
    #[serde(default = "default_cors_max_age_s")]
    pub max_age_s: u64,
}

fn default_cors_max_age_s() -> u64 {
    600
}

fn default_true() -> bool {
    true
}

impl RouteSettings {
    /// `roles` implies `auth`.
    pub fn needs_auth(&self) -> bool {
        self.auth || !self.roles.is_empty()
    }
}

/// A secret string: readable by the code that needs it, never printed.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { REDACTED })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(if self.0.is_empty() { "" } else { REDACTED })
    }
}

/// A Redis URL whose password, if any, is never printed.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct RedisUrl(String);

impl RedisUrl {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password replaced, for logs and `check-config`.
    pub fn redacted(&self) -> String {
        match url::Url::parse(&self.0) {
            Ok(mut url) if url.password().is_some() => {
                let _ = url.set_password(Some(REDACTED));
                url.to_string()
            }
            Ok(_) => self.0.clone(),
            Err(_) => REDACTED.to_owned(),
        }
    }
}

impl std::str::FromStr for RedisUrl {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Self(text.to_owned()))
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

/// Accepts a TOML array or a comma-separated string, so that list keys can be
/// overridden from one environment variable. Items are read as strings and
/// parsed with `FromStr`, so a bad item is named in either form.
fn list_or_csv<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: fmt::Display,
{
    struct Items;

    impl<'de> serde::de::Visitor<'de> for Items {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list or a comma-separated string")
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            Ok(text
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(str::to_owned)
                .collect())
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element()? {
                items.push(item);
            }
            Ok(items)
        }
    }

    deserializer
        .deserialize_any(Items)?
        .into_iter()
        .map(|item| {
            item.parse()
                .map_err(|err| serde::de::Error::custom(format!("{item:?}: {err}")))
        })
        .collect()
}

/// The names `auth.algorithms` accepts, spelt as in a token's `alg` header.
pub const ALGORITHM_NAMES: [&str; 12] = [
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

/// `auth.algorithms`: [`list_or_csv`] of names; an unknown one is refused with
/// the list of valid names (jsonwebtoken would only say `InvalidAlgorithmName`).
fn algorithm_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Algorithm>, D::Error> {
    list_or_csv::<D, String>(deserializer)?
        .iter()
        .map(|name| parse_algorithm(name).map_err(serde::de::Error::custom))
        .collect()
}

fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    name.parse().map_err(|_| {
        let hint = ALGORITHM_NAMES
            .iter()
            .find(|known| known.eq_ignore_ascii_case(name))
            .map(|known| format!(" (names are case-sensitive: {known:?})"))
            .unwrap_or_default();
        format!(
            "unknown algorithm {name:?}{hint}; expected one of {}",
            ALGORITHM_NAMES.join(", ")
        )
    })
}

/// Where the layers come from; `from_process` reads the real environment,
/// tests build one by hand.
#[derive(Debug, Clone)]
pub struct Sources {
    pub settings_dir: PathBuf,
    /// `GATEHOUSE_ENV`: picks `settings/{environment}.toml`.
    pub environment: String,
    /// The `--config` file, the last file layer.
    pub config_file: Option<PathBuf>,
    /// Environment variables considered for overrides.
    pub vars: HashMap<String, String>,
}

impl Sources {
    /// The files of the layers, in order, whether or not each exists: what
    /// a reload reads again and what `server.watch_config` watches.
    pub fn layer_files(&self) -> Vec<PathBuf> {
        let dir = &self.settings_dir;
        let mut files = vec![
            dir.join("default.toml"),
            dir.join(format!("{}.toml", self.environment)),
            dir.join("local.toml"),
        ];
        files.extend(self.config_file.clone());
        files
    }

    pub fn from_process(config_file: Option<PathBuf>) -> Self {
        let vars: HashMap<String, String> = std::env::vars().collect();
        Self {
            settings_dir: vars
                .get("GATEHOUSE_SETTINGS_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("settings")),
            environment: vars
                .get("GATEHOUSE_ENV")
                .filter(|env| !env.is_empty())
                .cloned()
                .unwrap_or_else(|| "development".to_owned()),
            config_file,
            vars,
        }
    }
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(String),
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

impl Settings {
    /// Reads every layer, then validates the result.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        let mut parsed = Parsed::from_tree(Self::read_layers(sources)?);
        let mut problems = std::mem::take(&mut parsed.problems);
        let Some(settings) = parsed.settings.take() else {
            return Err(ConfigError::Invalid(problems));
        };
        if let Err(invalid) = settings.validate() {
            problems.extend(
                invalid
                    .into_iter()
                    .filter(|line| !parsed.follows_from_dropped(&settings, line))
                    .map(|line| parsed.with_variable(line)),
            );
        }
        if problems.is_empty() {
            Ok(settings)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The merged layers as one tree of values, each leaf knowing its origin.
    fn read_layers(sources: &Sources) -> Result<config::Value, ConfigError> {
        use config::{Config, File};

        let dir = &sources.settings_dir;
        let default_file = dir.join("default.toml");
        if !default_file.is_file() {
            return Err(ConfigError::Load(format!(
                "{}: not found (set GATEHOUSE_SETTINGS_DIR to the settings directory)",
                default_file.display()
            )));
        }
        let mut builder = Config::builder()
            .add_source(File::from(default_file))
            .add_source(File::from(dir.join(format!("{}.toml", sources.environment))).required(false))
            .add_source(File::from(dir.join("local.toml")).required(false));
        if let Some(file) = &sources.config_file {
            if !file.is_file() {
                return Err(ConfigError::Load(format!("--config {}: not found", file.display())));
            }
            builder = builder.add_source(File::from(file.as_path()));
        }
        let config = builder
            .add_source(Variables::seed(&sources.vars))
            .add_source(Variables::structured(&sources.vars))
            .build()
            .map_err(|err| ConfigError::Load(err.to_string()))?;
        Ok(config.cache)
    }

    /// Every problem at once, each line `key: reason`.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let mut problem = |key: String, reason: String| problems.push(format!("{key}: {reason}"));

        match (&self.server.listen, &self.server.tls.listen) {
            (None, None) => problem(
                "server.listen".to_owned(),
                "is empty and so is server.tls.listen: the gateway needs a listener".to_owned(),
            ),
            (_, Some(_)) => {
                for (key, value) in [
                    ("server.tls.cert_file", &self.server.tls.cert_file),
                    ("server.tls.key_file", &self.server.tls.key_file),
                ] {
                    if value.is_empty() {
                        problem(key.to_owned(), "required when server.tls.listen is set".to_owned());
                    }
                }
            }
            (Some(_), None) => {}
        }

        let positive = [
            (
                "server.client_request_timeout_ms",
                self.server.client_request_timeout_ms,
            ),
            ("server.max_body_bytes", self.server.max_body_bytes),
            ("server.max_header_bytes", self.server.max_header_bytes as u64),
            ("upstream.connect_timeout_ms", self.upstream.connect_timeout_ms),
            ("upstream.request_timeout_ms", self.upstream.request_timeout_ms),
            (
                "upstream.max_connections_per_host",
                self.upstream.max_connections_per_host as u64,
            ),
            ("health.interval_ms", self.health.interval_ms),
            ("health.timeout_ms", self.health.timeout_ms),
            ("health.unhealthy_threshold", self.health.unhealthy_threshold.into()),
            ("health.healthy_threshold", self.health.healthy_threshold.into()),
            ("health.passive_failures", self.health.passive_failures.into()),
            ("rate_limit.redis_timeout_ms", self.rate_limit.redis_timeout_ms),
        ];
        for (key, value) in positive {
            if value == 0 {
                problem(key.to_owned(), "must be greater than 0".to_owned());
            }
        }

        if self.services.is_empty() {
            problem("services".to_owned(), "at least one service is required".to_owned());
        }
        for (name, service) in &self.services {
            let key = format!("services.{name}");
            if service.instances.is_empty() {
                problem(
                    format!("{key}.instances"),
                    "at least one instance URL is required".to_owned(),
                );
            }
            for url in &service.instances {
                if let Err(reason) = check_instance_url(url) {
                    problem(format!("{key}.instances"), format!("{url:?}: {reason}"));
                }
            }
            if !service.health_path.starts_with('/') {
                problem(format!("{key}.health_path"), "must start with \"/\"".to_owned());
            }
        }

        for (name, route) in &self.routes {
            let key = format!("routes.{name}");
            match routing::normalize_path(&route.prefix) {
                Ok(normalized) if normalized == route.prefix => {}
                Ok(normalized) => problem(
                    format!("{key}.prefix"),
                    format!(
                        "{:?} is not a normalized path (did you mean {normalized:?}?)",
                        route.prefix
                    ),
                ),
                Err(_) => problem(
                    format!("{key}.prefix"),
                    format!("{:?} is not a valid absolute path", route.prefix),
                ),
            }
            if let Some(reserved) = RESERVED_PATHS
                .iter()
                .find(|reserved| routing::prefix_matches(&route.prefix, reserved))
            {
                problem(
                    format!("{key}.prefix"),
                    format!(
                        "{:?} is reserved for the gateway's own {reserved} endpoint",
                        route.prefix
                    ),
                );
            }
            if !self.services.contains_key(&route.service) {
                problem(
                    format!("{key}.service"),
                    format!("no service named {:?}", route.service),
                );
            }
            for method in &route.methods {
                if routing::parse_method(method).is_none() {
                    problem(format!("{key}.methods"), format!("{method:?} is not an HTTP method"));
                }
            }
            if route.roles.iter().any(|role| role.is_empty()) {
                problem(format!("{key}.roles"), "roles must not be empty strings".to_owned());
            }
            if let Some(policy) = &route.rate_limit {
                if !self.rate_limit.policies.contains_key(policy) {
                    problem(format!("{key}.rate_limit"), format!("no policy named {policy:?}"));
                }
            }
            for host in &route.hosts {
                if let Err(reason) = routing::HostPattern::parse(host) {
                    problem(format!("{key}.hosts"), format!("{host:?} {reason}"));
                }
            }
            if let Some(cors) = &route.cors {
                for (field, reason) in crate::cors::problems(cors) {
                    problem(format!("{key}.cors.{field}"), reason);
                }
            }
        }
        // Two routes with one prefix and a method in common would make the
        // winner depend on file order.
        let routes: Vec<_> = self.routes.iter().collect();
        for (i, (name_a, a)) in routes.iter().enumerate() {
            for (name_b, b) in &routes[i + 1..] {
                let parsed = |methods: &[String]| -> Vec<_> {
                    methods.iter().filter_map(|m| routing::parse_method(m)).collect()
                };
                let (methods_a, methods_b) = (parsed(&a.methods), parsed(&b.methods));
                let methods_overlap = a.methods.is_empty()
                    || b.methods.is_empty()
                    || methods_a.iter().any(|method| methods_b.contains(method));
                // A route naming a host outranks one without `hosts`, and an
                // exact name a wildcard, so only equal entries tie.
                let same_host =
                    |x: &String, y: &String| x.trim_end_matches('.').eq_ignore_ascii_case(y.trim_end_matches('.'));
                let hosts_overlap = (a.hosts.is_empty() && b.hosts.is_empty())
                    || a.hosts
                        .iter()
                        .any(|host| b.hosts.iter().any(|other| same_host(host, other)));
                if a.prefix == b.prefix && methods_overlap && hosts_overlap {
                    problem(
                        format!("routes.{name_b}.prefix"),
                        format!(
                            "{:?} is also the prefix of routes.{name_a} for the same methods and hosts",
                            b.prefix
                        ),
                    );
                }
            }
        }

        let rate_limit = &self.rate_limit;
        if !rate_limit.global.is_empty() && !rate_limit.policies.contains_key(&rate_limit.global) {
            problem(
                "rate_limit.global".to_owned(),
                format!("no policy named {:?}", rate_limit.global),
            );
        }
        for (name, policy) in &rate_limit.policies {
            let key = format!("rate_limit.policies.{name}");
            if policy.window_s == 0 {
                problem(format!("{key}.window_s"), "must be greater than 0".to_owned());
            }
            if policy.max == 0 {
                problem(format!("{key}.max"), "must be greater than 0".to_owned());
            }
            if policy.max > MAX_POLICY_MAX {
                problem(format!("{key}.max"), format!("must be at most {MAX_POLICY_MAX}"));
            }
            if policy.window_s > MAX_WINDOW_S {
                problem(
                    format!("{key}.window_s"),
                    format!("must be at most {MAX_WINDOW_S} (366 days)"),
                );
            }
        }
        if rate_limit.redis_cluster.is_empty() {
            match url::Url::parse(rate_limit.redis_url.expose()) {
                Ok(url) if url.fragment().is_some() => {
                    problem("rate_limit.redis_url".to_owned(), NO_FRAGMENT.to_owned())
                }
                Ok(url) if matches!(url.scheme(), "redis" | "rediss" | "unix" | "redis+unix") => {}
                _ => problem(
                    "rate_limit.redis_url".to_owned(),
                    "must be a redis://, rediss:// or unix:// URL".to_owned(),
                ),
            }
        }
        let mut cluster_schemes = BTreeSet::new();
        for (index, seed) in rate_limit.redis_cluster.iter().enumerate() {
            let key = format!("rate_limit.redis_cluster[{index}]");
            match url::Url::parse(seed.expose()) {
                Ok(url) if url.fragment().is_some() => problem(key, NO_FRAGMENT.to_owned()),
                Ok(url) if matches!(url.scheme(), "redis" | "rediss") && url.host().is_some() => {
                    cluster_schemes.insert(url.scheme().to_owned());
                    if !matches!(url.path(), "" | "/" | "/0") {
                        problem(key, "a cluster has only database 0".to_owned());
                    }
                }
                _ => problem(key, "must be a redis:// or rediss:// URL with a host".to_owned()),
            }
        }
        if cluster_schemes.len() > 1 {
            problem(
                "rate_limit.redis_cluster".to_owned(),
                "mixes redis:// and rediss://; every node of a cluster is reached the same way".to_owned(),
            );
        }
        if rate_limit.key_prefix.is_empty() {
            problem("rate_limit.key_prefix".to_owned(), "must not be empty".to_owned());
        }

        for problem_line in self.auth_problems() {
            problems.push(problem_line);
        }

        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// `sliding_log` policies whose `max` makes a log per client expensive
    /// (SPEC §12): name and max.
    pub fn large_sliding_logs(&self) -> Vec<(&str, u64)> {
        self.rate_limit
            .policies
            .iter()
            .filter(|(_, policy)| policy.algorithm == LimitAlgorithm::SlidingLog && policy.max > LARGE_LOG_MAX)
            .map(|(name, policy)| (name.as_str(), policy.max))
            .collect()
    }

    /// The start-up refusals of SPEC §2: a route that needs auth must have a key
    /// for every configured algorithm family.
    fn auth_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let auth = &self.auth;
        if auth.algorithms.is_empty() {
            problems.push("auth.algorithms: at least one algorithm is required".to_owned());
        }
        if !auth.jwt_secret.is_empty() && auth.jwt_secret.expose().len() < MIN_HS_SECRET_BYTES {
            problems.push(format!("auth.jwt_secret: must be at least {MIN_HS_SECRET_BYTES} bytes"));
        }
        if !auth.jwks_url.is_empty() {
            match url::Url::parse(&auth.jwks_url) {
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
                _ => problems.push(format!(
                    "auth.jwks_url: {:?} is not an http:// or https:// URL",
                    auth.jwks_url
                )),
            }
        }
        if auth.jwks_refresh_s == 0 {
            problems.push("auth.jwks_refresh_s: must be at least 1".to_owned());
        }
        if auth.jwks_min_refetch_s > auth.jwks_refresh_s {
            problems.push(format!(
                "auth.jwks_min_refetch_s: {} is longer than auth.jwks_refresh_s ({})",
                auth.jwks_min_refetch_s, auth.jwks_refresh_s
            ));
        }
        let needs_auth = self.routes.values().any(RouteSettings::needs_auth);
        if !needs_auth {
            return problems;
        }
        problems.extend(auth.missing_secret());
        let has_public = auth.algorithms.iter().any(|alg| !is_hmac(*alg));
        if has_public && auth.public_key_pem.is_empty() && auth.jwks_url.is_empty() {
            problems.push(format!(
                "auth.public_key_pem: routes need auth with {} but no public key file or auth.jwks_url is set",
                algorithm_names(auth.algorithms.iter().filter(|alg| !is_hmac(**alg)))
            ));
        }
        // The key file itself is read by `gateway::compile`, as start-up
        // and every reload do.
        problems
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|err| format!("# cannot render settings: {err}\n"))
    }

    /// True when the configured HS secret is the development one shipped in
    /// `settings/development.toml`.
    pub fn uses_dev_secret(&self) -> bool {
        self.auth.jwt_secret.expose().starts_with(DEV_SECRET_MARKER)
    }
}

/// Every shipped development secret starts with this, so the gateway can warn.
pub const DEV_SECRET_MARKER: &str = "dev-only-insecure-secret";

pub fn is_hmac(algorithm: Algorithm) -> bool {
    matches!(algorithm, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

fn algorithm_names<'a>(algorithms: impl Iterator<Item = &'a Algorithm>) -> String {
    algorithms.map(|alg| format!("{alg:?}")).collect::<Vec<_>>().join("/")
}

fn check_instance_url(raw: &str) -> Result<(), String> {
    let url = url::Url::parse(raw).map_err(|err| format!("not an absolute URL ({err})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("scheme must be http or https".to_owned());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("a host is required".to_owned());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials in instance URLs are not supported".to_owned());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("a query or fragment is not allowed".to_owned());
    }
    Ok(())
}

/// Environment variables as a layer. Each value's origin names its variable,
/// so that a problem with it can say where it came from.
#[derive(Debug, Clone)]
struct Variables(config::Map<String, config::Value>);

/// How a value set by an environment variable names its origin.
const VARIABLE_ORIGIN: &str = "the environment variable ";

impl Variables {
    /// The seed tutorial's variables, below `GATEHOUSE__…` in precedence.
    fn seed(vars: &HashMap<String, String>) -> Self {
        let mut map = config::Map::new();
        let mut set = |var: &str, key: String| {
            if let Some(value) = vars.get(var) {
                map.insert(key, variable_value(var, value));
            }
        };
        set("JWT_SECRET", "auth.jwt_secret".to_owned());
        set("REDIS_URL", "rate_limit.redis_url".to_owned());
        for (var, service) in SEED_SERVICE_VARS {
            set(var, format!("services.{service}.instances"));
        }
        Self(map)
    }

    /// `GATEHOUSE__SECTION__KEY` sets `section.key` (lower-cased, as the
    /// settings files spell their keys).
    fn structured(vars: &HashMap<String, String>) -> Self {
        let prefix = format!("{ENV_PREFIX}__");
        let map = vars
            .iter()
            .filter_map(|(var, value)| {
                let key = var.strip_prefix(&prefix)?.to_lowercase().replace("__", ".");
                Some((key, variable_value(var, value)))
            })
            .collect();
        Self(map)
    }
}

fn variable_value(var: &str, value: &str) -> config::Value {
    config::Value::new(Some(&format!("{VARIABLE_ORIGIN}{var}")), value.to_owned())
}

impl config::Source for Variables {
    fn clone_into_box(&self) -> Box<dyn config::Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<config::Map<String, config::Value>, config::ConfigError> {
        // Dotted keys must be expanded into nested tables, as other sources do.
        let mut root = config::Map::new();
        for (key, value) in &self.0 {
            insert_dotted(&mut root, key, value.clone());
        }
        Ok(root)
    }
}

fn insert_dotted(table: &mut config::Map<String, config::Value>, key: &str, value: config::Value) {
    match key.split_once('.') {
        None => {
            table.insert(key.to_owned(), value);
        }
        Some((head, rest)) => {
            let entry = table
                .entry(head.to_owned())
                .or_insert_with(|| config::Value::new(None, config::Map::<String, config::Value>::new()));
            let mut nested = entry.clone().into_table().unwrap_or_default();
            insert_dotted(&mut nested, rest, value);
            *entry = config::Value::new(None, nested);
        }
    }
}

/// The merged tree read into [`Settings`] as far as it goes, and every problem
/// met on the way.
///
/// serde stops at the first error, so each pass that fails reports that error
/// with its key, takes the bad value out of the tree and reads the rest again:
/// a typo in one section hides no problem in another. Each pass removes a value,
/// so the loop ends. A required key that is missing takes its whole entry out
/// (a route without `prefix` is no route), and the keys nobody knows are
/// gathered over every pass.
struct Parsed {
    /// `None` when some error could not be isolated to one value.
    settings: Option<Settings>,
    /// Unknown keys and unreadable values, sorted by key.
    problems: Vec<String>,
    /// The keys taken out of the tree.
    dropped: Vec<String>,
    /// The tree without them, to find where a value came from.
    tree: config::Value,
}

/// One step down the tree: a table key or a list index.
#[derive(Debug, Clone)]
enum Step {
    Key(String),
    Index(usize),
}

impl Parsed {
    fn from_tree(mut tree: config::Value) -> Self {
        let mut unknown: BTreeMap<String, Vec<Step>> = BTreeMap::new();
        let mut problems = Vec::new();
        let mut dropped: Vec<String> = Vec::new();
        let settings = loop {
            let mut note_unknown = |path: serde_ignored::Path| {
                unknown.insert(path.to_string(), ignored_steps(&path));
            };
            let tracked = serde_ignored::Deserializer::new(tree.clone(), &mut note_unknown);
            let error = match serde_path_to_error::deserialize::<_, Settings>(tracked) {
                Ok(settings) => break Some(settings),
                Err(error) => error,
            };
            let key = error.path().to_string();
            let steps: Option<Vec<Step>> = error
                .path()
                .iter()
                .map(|segment| match segment {
                    serde_path_to_error::Segment::Map { key } => Some(Step::Key(key.clone())),
                    serde_path_to_error::Segment::Seq { index } => Some(Step::Index(*index)),
                    _ => None,
                })
                .collect();
            match error.into_inner() {
                config::ConfigError::NotFound(field) => {
                    // config prefixes the whole path; serde's path already has it.
                    let field = field.rsplit('.').next().unwrap_or_default();
                    let missing = format!("{key}.{field}");
                    // Missing because an earlier pass dropped it: already reported.
                    if !dropped.contains(&missing) {
                        problems.push(format!("{missing}: required key is missing"));
                    }
                }
                other => {
                    // Any origin helps here: a wrong type may come from any layer.
                    let origin = steps.as_deref().and_then(|steps| leaf_origin(&tree, steps));
                    let from = origin.map(|origin| format!(" (from {origin})")).unwrap_or_default();
                    problems.push(format!("{key}: {}{from}", read_error_reason(&other)));
                }
            }
            match steps {
                Some(steps) if remove_at(&mut tree, &steps).is_some() => dropped.push(key),
                _ => break None,
            }
        };
        for (key, steps) in unknown {
            problems.push(with_variable(&tree, &steps, format!("{key}: unknown key")));
        }
        problems.sort();
        Self {
            settings,
            problems,
            dropped,
            tree,
        }
    }

    /// True when the validation problem `line` may only echo a dropped value:
    /// it names a key in a dropped entry (which got its default), or it is a
    /// reference to a dropped service or policy ("no service named …").
    fn follows_from_dropped(&self, settings: &Settings, line: &str) -> bool {
        let key = line.split(": ").next().unwrap_or(line);
        let touched = [Some(key.to_owned()), referenced_entry(settings, key)];
        self.dropped.iter().map(|dropped| entry_of(dropped)).any(|entry| {
            touched
                .iter()
                .flatten()
                .any(|key| contains_key(key, &entry) || contains_key(&entry, key))
        })
    }

    /// `line`, naming the environment variable that set its key, if one did.
    fn with_variable(&self, line: String) -> String {
        let key = line.split(": ").next().unwrap_or(&line);
        // `key[i]` names an item of a list; a variable sets the whole list.
        let steps: Vec<Step> = key
            .split('.')
            .map(|part| Step::Key(part.split('[').next().unwrap_or(part).to_owned()))
            .collect();
        with_variable(&self.tree, &steps, line)
    }
}

/// Appends ` (from the environment variable NAME)` when the value at `steps`
/// came from one: that is the value an operator would not find by reading
/// the files. (Lines about file values keep the spec's `key: reason` shape.)
fn with_variable(tree: &config::Value, steps: &[Step], line: String) -> String {
    match leaf_origin(tree, steps) {
        Some(origin) if origin.starts_with(VARIABLE_ORIGIN) => format!("{line} (from {origin})"),
        _ => line,
    }
}

/// The readable part of a deserialising error: config repeats the key and the
/// origin, which the caller words itself.
fn read_error_reason(error: &config::ConfigError) -> String {
    match error {
        config::ConfigError::Type {
            unexpected, expected, ..
        } => format!("invalid type: {unexpected}, expected {expected}"),
        config::ConfigError::At { error, .. } => read_error_reason(error),
        other => other.to_string(),
    }
}

/// The entry a key belongs to, for [`Parsed::follows_from_dropped`]. Every
/// `auth` check depends on the algorithms (which keys are needed, and how
/// they are read), so those stand for the whole section.
fn entry_of(key: &str) -> String {
    if contains_key("auth.algorithms", key) {
        return "auth".to_owned();
    }
    for map in ["services.", "routes.", "rate_limit.policies."] {
        if let Some(rest) = key.strip_prefix(map) {
            let name = rest.split(['.', '[']).next().unwrap_or(rest);
            return format!("{map}{name}");
        }
    }
    key.to_owned()
}

/// The service or policy entry a validation problem's key refers to.
fn referenced_entry(settings: &Settings, key: &str) -> Option<String> {
    if key == "rate_limit.global" {
        return Some(format!("rate_limit.policies.{}", settings.rate_limit.global));
    }
    let route = key.strip_prefix("routes.")?;
    if let Some(name) = route.strip_suffix(".service") {
        return Some(format!("services.{}", settings.routes.get(name)?.service));
    }
    let name = route.strip_suffix(".rate_limit")?;
    let policy = settings.routes.get(name)?.rate_limit.as_ref()?;
    Some(format!("rate_limit.policies.{policy}"))
}

/// `outer` is `inner` or one of its ancestors.
fn contains_key(outer: &str, inner: &str) -> bool {
    inner
        .strip_prefix(outer)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

fn ignored_steps(path: &serde_ignored::Path) -> Vec<Step> {
    use serde_ignored::Path;
    match path {
        Path::Root => Vec::new(),
        Path::Seq { parent, index } => {
            let mut steps = ignored_steps(parent);
            steps.push(Step::Index(*index));
            steps
        }
        Path::Map { parent, key } => {
            let mut steps = ignored_steps(parent);
            steps.push(Step::Key(key.clone()));
            steps
        }
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => {
            ignored_steps(parent)
        }
    }
}

fn value_at<'a>(tree: &'a config::Value, steps: &[Step]) -> Option<&'a config::Value> {
    steps.iter().try_fold(tree, |node, step| match (&node.kind, step) {
        (config::ValueKind::Table(table), Step::Key(key)) => table.get(key),
        (config::ValueKind::Array(items), Step::Index(index)) => items.get(*index),
        _ => None,
    })
}

/// Where the value at `steps` was set, unless it is a table (a table's origin
/// is only the first layer that opened it).
fn leaf_origin<'a>(tree: &'a config::Value, steps: &[Step]) -> Option<&'a str> {
    value_at(tree, steps)
        .filter(|value| !matches!(value.kind, config::ValueKind::Table(_)))
        .and_then(config::Value::origin)
}

fn remove_at(tree: &mut config::Value, steps: &[Step]) -> Option<()> {
    let (last, parents) = steps.split_last()?;
    let mut node = tree;
    for step in parents {
        node = match (&mut node.kind, step) {
            (config::ValueKind::Table(table), Step::Key(key)) => table.get_mut(key)?,
            (config::ValueKind::Array(items), Step::Index(index)) => items.get_mut(*index)?,
            _ => return None,
        };
    }
    match (&mut node.kind, last) {
        (config::ValueKind::Table(table), Step::Key(key)) => table.remove(key).map(drop),
        (config::ValueKind::Array(items), Step::Index(index)) if *index < items.len() => {
            items.remove(*index);
            Some(())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings_with(extra: &str) -> Result<Settings, ConfigError> {
        settings_with_vars(extra, &[])
    }

    fn settings_with_vars(extra: &str, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("default.toml"),
            format!(
                r#"
[services.user]
instances = ["http://127.0.0.1:3001"]
[routes.users]
prefix = "/api/users"
service = "user"
{extra}
"#
            ),
        )
        .unwrap();
        Settings::load(&Sources {
            settings_dir: dir.path().to_owned(),
            environment: "test".to_owned(),
            config_file: None,
            vars: vars
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
        })
    }

    fn problems(extra: &str) -> Vec<String> {
        problems_with_vars(extra, &[])
    }

    /// Problems found by the compile step, which reads the key files.
    fn compile_problems(extra: &str) -> Vec<String> {
        let settings = settings_with(extra).expect("the settings themselves are valid");
        match crate::gateway::compile(&settings) {
            Err(problems) => problems,
            Ok(_) => panic!("expected compile problems"),
        }
    }

    fn problems_with_vars(extra: &str, vars: &[(&str, &str)]) -> Vec<String> {
        match settings_with_vars(extra, vars) {
            Err(ConfigError::Invalid(problems)) => problems,
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    #[test]
    fn a_minimal_file_gets_every_default() {
        let settings = settings_with("").unwrap();
        assert_eq!(settings.server.listen, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(settings.upstream.request_timeout_ms, 30_000);
        assert_eq!(settings.health.unhealthy_threshold, 2);
        assert_eq!(settings.auth.algorithms, vec![Algorithm::HS256]);
        assert_eq!(settings.rate_limit.backend, RateLimitBackend::Memory);
        assert_eq!(settings.services["user"].health_path, "/health");
    }

    #[test]
    fn validation_names_the_key_and_the_reason() {
        let cases = [
            (
                "[routes.bad]\nprefix = \"/x\"\nservice = \"usr\"",
                "routes.bad.service: no service named \"usr\"",
            ),
            (
                "[routes.h]\nprefix = \"/health\"\nservice = \"user\"",
                "routes.h.prefix: \"/health\" is reserved",
            ),
            (
                "[routes.m]\nprefix = \"/metrics/x\"\nservice = \"user\"",
                "routes.m.prefix: \"/metrics/x\" is reserved",
            ),
            (
                "[routes.r]\nprefix = \"api\"\nservice = \"user\"",
                "routes.r.prefix: \"api\" is not a valid absolute path",
            ),
            (
                "[routes.d]\nprefix = \"/a/../b\"\nservice = \"user\"",
                "routes.d.prefix: \"/a/../b\" is not a normalized path",
            ),
            (
                "[routes.p]\nprefix = \"/p\"\nservice = \"user\"\nrate_limit = \"nope\"",
                "routes.p.rate_limit: no policy named \"nope\"",
            ),
            (
                "[routes.q]\nprefix = \"/q\"\nservice = \"user\"\nmethods = [\"G T\"]",
                "routes.q.methods: \"G T\" is not an HTTP method",
            ),
            (
                "[services.bad]\ninstances = [\"ftp://x\"]",
                "services.bad.instances: \"ftp://x\": scheme must be http or https",
            ),
            (
                "[services.rel]\ninstances = [\"/relative\"]",
                "services.rel.instances: \"/relative\": not an absolute URL",
            ),
            (
                "[services.none]\ninstances = []",
                "services.none.instances: at least one instance URL is required",
            ),
            (
                "[health]\ninterval_ms = 0",
                "health.interval_ms: must be greater than 0",
            ),
            (
                "[rate_limit]\nglobal = \"missing\"",
                "rate_limit.global: no policy named \"missing\"",
            ),
            (
                "[rate_limit]\nredis_url = \"http://x\"",
                "rate_limit.redis_url: must be a redis://",
            ),
            (
                "[rate_limit]\nredis_cluster = [\"redis://127.0.0.1:7000\", \"http://x\"]",
                "rate_limit.redis_cluster[1]: must be a redis:// or rediss:// URL with a host",
            ),
            (
                "[rate_limit]\nredis_url = \"rediss://127.0.0.1:6380/#insecure\"",
                "rate_limit.redis_url: must not have a #fragment",
            ),
            (
                "[rate_limit]\nredis_cluster = [\"rediss://127.0.0.1:7000#insecure\"]",
                "rate_limit.redis_cluster[0]: must not have a #fragment",
            ),
            (
                "[rate_limit.policies.p]\nwindow_s = 1\nmax = 1000000001",
                "rate_limit.policies.p.max: must be at most 1000000000",
            ),
            (
                "[rate_limit.policies.p]\nwindow_s = 31622401\nmax = 1",
                "rate_limit.policies.p.window_s: must be at most 31622400",
            ),
            (
                "[rate_limit]\nredis_cluster = [\"redis://127.0.0.1:7000/2\"]",
                "rate_limit.redis_cluster[0]: a cluster has only database 0",
            ),
            (
                "[rate_limit]\nredis_cluster = [\"redis://127.0.0.1:7000\", \"rediss://127.0.0.1:7001\"]",
                "rate_limit.redis_cluster: mixes redis:// and rediss://",
            ),
            (
                "[rate_limit.policies.p]\nwindow_s = 1\nmax = 1\nalgorithm = \"leaky\"",
                "rate_limit.policies.p.algorithm: unknown algorithm \"leaky\"; expected \"sliding_log\" or \"sliding_window\"",
            ),
            (
                "[routes.dup]\nprefix = \"/api/users\"\nservice = \"user\"",
                "routes.users.prefix: \"/api/users\" is also the prefix of routes.dup",
            ),
        ];
        for (extra, expected) in cases {
            let found = problems(extra);
            assert!(
                found.iter().any(|line| line.starts_with(expected)),
                "for {extra:?} expected a line starting {expected:?}, got {found:?}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let found =
            problems("[health]\ninterval_ms = 0\ntimeout_ms = 0\n[routes.x]\nprefix = \"/x\"\nservice = \"nope\"");
        assert_eq!(found.len(), 3, "{found:?}");
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let found = problems("[server]\nlistn = \"127.0.0.1:1\"");
        assert_eq!(found, vec!["server.listn: unknown key"]);
        let found = problems("[routes.users.extra]\nx = 1");
        assert_eq!(found, vec!["routes.users.extra: unknown key"]);
        let found = problems(
            "[server]\nlistn = 1
[health]\ninterval_ms = 0\n[rate_limit.policies.p]\nwindow_s = 1\nmax = 1\nmesage = \"x\"",
        );
        assert_eq!(
            found,
            vec![
                "rate_limit.policies.p.mesage: unknown key",
                "server.listn: unknown key",
                "health.interval_ms: must be greater than 0"
            ],
            "unknown keys are reported with every other problem"
        );
    }

    #[test]
    fn auth_routes_need_a_long_enough_secret() {
        let found = problems("auth = true");
        assert!(
            found.iter().any(|l| l.starts_with("auth.jwt_secret: routes need auth")),
            "{found:?}"
        );
        let found = problems("auth = true\n[auth]\njwt_secret = \"short\"");
        assert!(
            found
                .iter()
                .any(|l| l.starts_with("auth.jwt_secret: must be at least 32 bytes")),
            "{found:?}"
        );
        let found = problems("auth = true\n[auth]\nalgorithms = [\"RS256\"]");
        assert!(found.iter().any(|l| l.starts_with("auth.public_key_pem:")), "{found:?}");
        let found =
            compile_problems("auth = true\n[auth]\nalgorithms = [\"RS256\"]\npublic_key_pem = \"/nonexistent.pem\"");
        assert!(
            found.iter().any(|l| l.starts_with("auth.public_key_pem: cannot read")),
            "{found:?}"
        );
    }

    #[test]
    fn secrets_are_redacted_in_the_printed_config() {
        let settings = settings_with(
            "[auth]\njwt_secret = \"0123456789abcdef0123456789abcdef-top\"\n[rate_limit]\nredis_url = \"redis://:hunter2@127.0.0.1:6379/0\"",
        )
        .unwrap();
        let printed = settings.to_redacted_toml();
        assert!(!printed.contains("0123456789abcdef"), "{printed}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(
            printed.contains("redis://:%3Credacted%3E@127.0.0.1:6379/0") || printed.contains("<redacted>"),
            "{printed}"
        );
        assert!(!format!("{settings:?}").contains("hunter2"));
    }

    #[test]
    fn an_unknown_section_and_a_policy_without_max_are_both_reported() {
        let found = problems("[routs.x]\nprefix = \"/x\"\n[rate_limit.policies.p]\nwindow_s = 60");
        assert_eq!(
            found,
            vec![
                "rate_limit.policies.p.max: required key is missing",
                "routs: unknown key"
            ]
        );
    }

    #[test]
    fn bad_types_in_two_sections_are_both_reported_with_their_files() {
        let found = problems("[server]\nworkers = \"many\"\n[health]\ntimeout_ms = \"soon\"");
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].starts_with("health.timeout_ms: invalid type: string \"soon\", expected an integer (from "),
            "{found:?}"
        );
        assert!(found[0].ends_with("default.toml)"), "{found:?}");
        assert!(
            found[1].starts_with("server.workers: invalid type: string \"many\", expected an integer (from "),
            "{found:?}"
        );
    }

    #[test]
    fn bad_values_are_reported_with_unknown_keys_and_independent_validation() {
        let found = problems(
            "[server]\nlistn = 1\nlisten = \"nowhere\"\n[health]\ninterval_ms = 0\n[routes.extra]\nprefix = \"/extra\"\nservice = \"user\"\nstrip_prefix = \"yes please\"",
        );
        assert_eq!(found.len(), 4, "{found:?}");
        for expected in [
            "routes.extra.strip_prefix: invalid type: string \"yes please\", expected a boolean",
            "server.listen: invalid socket address syntax",
            "server.listn: unknown key",
            "health.interval_ms: must be greater than 0",
        ] {
            assert!(
                found.iter().any(|line| line.starts_with(expected)),
                "{expected}: {found:?}"
            );
        }
        assert_eq!(
            found[3], "health.interval_ms: must be greater than 0",
            "validation comes last"
        );
    }

    #[test]
    fn a_dropped_entry_causes_no_echo_problems() {
        // Route x's required `prefix` is unreadable: one problem, not also
        // "missing". Service `other` and policy `p` cannot be read: route y
        // naming the service and `global` naming the policy are not reported
        // as dangling references.
        let found = problems(
            "[routes.x]\nprefix = [1]\nservice = \"other\"\n[routes.y]\nprefix = \"/y\"\nservice = \"other\"\n[services.other]\ninstances = 5\n[rate_limit]\nglobal = \"p\"\n[rate_limit.policies.p]\nmax = 1",
        );
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(
            found[0].starts_with("rate_limit.policies.p.window_s: required key is missing"),
            "{found:?}"
        );
        assert!(
            found[1].starts_with("routes.x.prefix: invalid type: sequence, expected a string"),
            "{found:?}"
        );
        assert!(
            found[2].starts_with("services.other.instances: invalid type: integer `5`, expected a list"),
            "{found:?}"
        );
    }

    #[test]
    fn problems_with_values_from_the_environment_name_the_variable() {
        let found = problems_with_vars(
            "",
            &[
                ("GATEHOUSE__SERVER__WORKERS", "abc"),
                ("GATEHOUSE__SERVER__LISTN", "x"),
                ("GATEHOUSE__HEALTH__INTERVAL_MS", "0"),
                ("JWT_SECRET", "short"),
            ],
        );
        assert_eq!(
            found,
            vec![
                "server.listn: unknown key (from the environment variable GATEHOUSE__SERVER__LISTN)",
                "server.workers: invalid type: string \"abc\", expected an integer (from the environment variable GATEHOUSE__SERVER__WORKERS)",
                "health.interval_ms: must be greater than 0 (from the environment variable GATEHOUSE__HEALTH__INTERVAL_MS)",
                "auth.jwt_secret: must be at least 32 bytes (from the environment variable JWT_SECRET)",
            ]
        );
    }

    #[test]
    fn a_bad_cluster_seed_from_the_environment_names_the_variable() {
        let found = problems_with_vars(
            "",
            &[(
                "GATEHOUSE__RATE_LIMIT__REDIS_CLUSTER",
                "redis://127.0.0.1:7000,http://x",
            )],
        );
        assert!(
            found
                .iter()
                .any(|line| line.starts_with("rate_limit.redis_cluster[1]: ")
                    && line.ends_with("(from the environment variable GATEHOUSE__RATE_LIMIT__REDIS_CLUSTER)")),
            "{found:?}"
        );
    }

    #[test]
    fn redis_over_tls_a_cluster_and_sliding_windows_are_accepted() {
        let settings = settings_with(
            "[rate_limit]\nredis_url = \"rediss://:pw@redis.example:6380\"\n\
             redis_cluster = \"rediss://a.example:7000, rediss://b.example:7001\"\n\
             [rate_limit.policies.big]\nwindow_s = 3600\nmax = 100000\nalgorithm = \"sliding_window\"\n\
             [rate_limit.policies.huge_log]\nwindow_s = 3600\nmax = 10001",
        )
        .expect("valid");
        let seeds: Vec<&str> = settings.rate_limit.redis_cluster.iter().map(RedisUrl::expose).collect();
        assert_eq!(seeds, ["rediss://a.example:7000", "rediss://b.example:7001"]);
        assert_eq!(
            settings.rate_limit.policies["big"].algorithm,
            LimitAlgorithm::SlidingWindow
        );
        assert_eq!(
            settings.large_sliding_logs(),
            [("huge_log", 10_001)],
            "only the log is warned about"
        );
    }

    #[test]
    fn an_unknown_algorithm_is_refused_with_the_valid_names() {
        let expected = "auth.algorithms: unknown algorithm \"HS999\"; expected one of HS256, HS384, HS512, \
                        RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA";
        let found = problems("[auth]\nalgorithms = [\"HS256\", \"HS999\"]");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with(expected), "{found:?}");
        let found = problems_with_vars("", &[("GATEHOUSE__AUTH__ALGORITHMS", "rs256")]);
        assert_eq!(
            found,
            vec![
                "auth.algorithms: unknown algorithm \"rs256\" (names are case-sensitive: \"RS256\"); expected one of \
                 HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA \
                 (from the environment variable GATEHOUSE__AUTH__ALGORITHMS)"
            ]
        );
    }

    #[test]
    fn every_listed_algorithm_name_is_accepted() {
        for name in ALGORITHM_NAMES {
            let algorithm = parse_algorithm(name).unwrap();
            assert_eq!(format!("{algorithm:?}"), name);
        }
    }

    #[test]
    fn a_key_file_of_the_wrong_kind_says_which_key_was_expected() {
        let keys = tempfile::tempdir().unwrap();
        let fixture = |name: &str| format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let not_pem = keys.path().join("not-pem.txt");
        std::fs::write(&not_pem, "hello\n").unwrap();
        // RFC 8410's example Ed25519 public key.
        let ed25519 = keys.path().join("ed25519.pem");
        std::fs::write(
            &ed25519,
            "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n",
        )
        .unwrap();
        let not_pem = not_pem.display().to_string();
        let rsa = fixture("rsa-test-public.pem");
        let ec = fixture("ec-p256-test-public.pem");
        let cases = [
            (
                "RS256",
                not_pem.clone(),
                format!("auth.public_key_pem: {not_pem}: not a PEM public key: expected an RSA public key (BEGIN PUBLIC KEY or BEGIN RSA PUBLIC KEY) for RS256"),
            ),
            (
                "ES256",
                rsa.clone(),
                format!("auth.public_key_pem: {rsa}: holds an RSA public key: expected an EC P-256 public key (BEGIN PUBLIC KEY) for ES256"),
            ),
            (
                "EdDSA",
                ec.clone(),
                format!("auth.public_key_pem: {ec}: holds an EC public key: expected an Ed25519 public key (BEGIN PUBLIC KEY) for EdDSA"),
            ),
            (
                "PS384",
                fixture("rsa-test-private.pem"),
                "holds a private key, not a public key: expected an RSA public key (BEGIN PUBLIC KEY or BEGIN RSA PUBLIC KEY) for PS384".to_owned(),
            ),
        ];
        for (algorithm, path, expected) in cases {
            let found = compile_problems(&format!(
                "auth = true\n[auth]\nalgorithms = [\"{algorithm}\"]\npublic_key_pem = {path:?}"
            ));
            assert!(
                found.iter().any(|line| line.ends_with(&expected)),
                "{expected}: {found:?}"
            );
        }
        let usable = format!(
            "auth = true\n[auth]\nalgorithms = [\"EdDSA\"]\npublic_key_pem = {:?}",
            ed25519.display().to_string()
        );
        let settings = settings_with(&usable).unwrap();
        assert!(
            crate::gateway::compile(&settings).is_ok(),
            "an Ed25519 public key serves EdDSA"
        );
    }
}
