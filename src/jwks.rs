//! A provider's JSON Web Key Set (SPEC §11), as the verifier uses it: the
//! usable signing keys of one fetched set, and which of them, if any, may
//! check a given token.
//!
//! Only the set decides: a token's `jku`, `x5u`, `x5c` and `jwk` headers are
//! never read, symmetric (`oct`) keys are dropped when the set is parsed, and
//! a key must suit the token's `alg` by family and curve and by the JWK's own
//! `alg` and `use` when it states them, so a key published for one
//! algorithm cannot be turned to another (an ES256 key for an RS256 token, a
//! modulus as an HMAC secret).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use actix::{Actor, ActorContext, ActorFutureExt, Addr, AsyncContext, Context, Handler};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Header};
use serde_json::Value;

use crate::settings::AuthSettings;

/// The largest key set read; a larger answer is not a key set.
pub const MAX_SET_BYTES: usize = 1024 * 1024;

/// What kind of public key an algorithm needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyKind {
    fn of_algorithm(algorithm: Algorithm) -> Option<Self> {
        match algorithm {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => Some(Self::Rsa),
            Algorithm::ES256 => Some(Self::P256),
            Algorithm::ES384 => Some(Self::P384),
            Algorithm::EdDSA => Some(Self::Ed25519),
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => None,
        }
    }

    /// `None` for keys the gateway never verifies with: symmetric ones, and
    /// curves no accepted algorithm uses (P-521).
    fn of_jwk(jwk: &Jwk) -> Option<Self> {
        match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Some(Self::Rsa),
            AlgorithmParameters::EllipticCurve(params) => match params.curve {
                EllipticCurve::P256 => Some(Self::P256),
                EllipticCurve::P384 => Some(Self::P384),
                EllipticCurve::P521 | EllipticCurve::Ed25519 => None,
            },
            AlgorithmParameters::OctetKeyPair(params) => {
                (params.curve == EllipticCurve::Ed25519).then_some(Self::Ed25519)
            }
            AlgorithmParameters::OctetKey(_) => None,
        }
    }
}

/// One usable signing key of a set.
struct SetKey {
    kid: Option<String>,
    /// The key's public parameters, to tell a key replaced under the same
    /// `kid`.
    material: String,
    kind: KeyKind,
    /// The JWK's own `alg`, when it states one.
    algorithm: Option<Algorithm>,
    key: DecodingKey,
}

impl SetKey {
    fn suits(&self, algorithm: Algorithm) -> bool {
        KeyKind::of_algorithm(algorithm) == Some(self.kind) && self.algorithm.is_none_or(|own| own == algorithm)
    }
}

/// The usable signing keys of one fetched set; immutable once built.
pub struct KeySet {
    keys: Vec<SetKey>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<_> = self.keys.iter().map(|key| (&key.kid, key.kind)).collect();
        f.debug_struct("KeySet").field("keys", &kids).finish()
    }
}

/// Which key checks a token, as far as the set can tell.
pub enum KeyChoice<'a> {
    Found(&'a DecodingKey),
    /// The token names a `kid` the set does not hold: a refetch may find it.
    UnknownKid,
    /// No key of the set may check this token.
    NoSuitableKey,
}

impl KeySet {
    /// Parses a fetched set. `Err` says why the body is not a key set; keys
    /// the gateway cannot or must not use (symmetric, encryption-only, of an
    /// unknown type or curve, malformed) are left out, not an error.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        if body.len() > MAX_SET_BYTES {
            return Err(format!("{} bytes, over the {MAX_SET_BYTES}-byte limit", body.len()));
        }
        let document: Value = serde_json::from_slice(body).map_err(|err| format!("not JSON: {err}"))?;
        let entries = document
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| "not a JSON Web Key Set (no \"keys\" array)".to_owned())?;
        let keys = entries
            .iter()
            .filter_map(|entry| serde_json::from_value::<Jwk>(entry.clone()).ok())
            .filter_map(|jwk| {
                let signing = match &jwk.common.public_key_use {
                    None | Some(PublicKeyUse::Signature) => true,
                    Some(_) => false,
                };
                let kind = KeyKind::of_jwk(&jwk).filter(|_| signing)?;
                let algorithm = match jwk.common.key_algorithm {
                    None => None,
                    // A stated algorithm the gateway cannot verify with (an
                    // encryption one, say) makes the key unusable.
                    Some(stated) => Some(signing_algorithm(stated)?),
                };
                let key = DecodingKey::from_jwk(&jwk).ok()?;
                Some(SetKey {
                    kid: jwk.common.key_id.clone(),
                    material: serde_json::to_string(&jwk.algorithm).ok()?,
                    kind,
                    algorithm,
                    key,
                })
            })
            .collect();
        Ok(Self { keys })
    }

    /// Usable signing keys in the set.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The kids of the set's keys.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().filter_map(|key| key.kid.as_deref())
    }

    /// Some key of `self` is not in `next` (gone, or replaced under its
    /// `kid`): what it verified must not be trusted any more.
    pub fn loses_keys_in(&self, next: &KeySet) -> bool {
        self.keys.iter().any(|key| {
            !next
                .keys
                .iter()
                .any(|kept| kept.kid == key.kid && kept.material == key.material)
        })
    }

    /// The key for a token with this header (whose `alg` the verifier has
    /// accepted): by `kid` when it has one, else the set's only key of the
    /// token's kind, if it has exactly one.
    pub fn choose(&self, header: &Header) -> KeyChoice<'_> {
        match &header.kid {
            Some(kid) => {
                let mut named = self.keys.iter().filter(|key| key.kid.as_deref() == Some(kid.as_str()));
                let Some(first) = named.next() else {
                    return KeyChoice::UnknownKid;
                };
                std::iter::once(first)
                    .chain(named)
                    .find(|key| key.suits(header.alg))
                    .map_or(KeyChoice::NoSuitableKey, |key| KeyChoice::Found(&key.key))
            }
            None => {
                let mut suitable = self.keys.iter().filter(|key| key.suits(header.alg));
                match (suitable.next(), suitable.next()) {
                    (Some(only), None) => KeyChoice::Found(&only.key),
                    _ => KeyChoice::NoSuitableKey,
                }
            }
        }
    }
}

/// The signing algorithm a JWK's `alg` names, if it is one.
fn signing_algorithm(stated: KeyAlgorithm) -> Option<Algorithm> {
    Some(match stated {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// How long a request waits for a refetch its unknown `kid` asked for.
const REFETCH_WAIT: Duration = Duration::from_secs(2);
/// A fetch gives up after this long.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// The key set in force and what `/health` says of it, shared by the
/// verifier (every worker) and the [`JwksFetcher`] that replaces it.
pub struct JwksKeys {
    url: String,
    refresh: Duration,
    min_refetch: Duration,
    set: RwLock<Option<Arc<KeySet>>>,
    /// Bumped when a kid leaves the set: token caches then forget what
    /// they verified.
    removals: AtomicU64,
    status: Mutex<FetchStatus>,
    /// The number of fetches finished; waiters for a refetch watch it.
    finished: tokio::sync::watch::Sender<u64>,
    schedule: Mutex<Schedule>,
    fetcher: Mutex<Option<Addr<JwksFetcher>>>,
}

#[derive(Default)]
struct FetchStatus {
    last_success: Option<SystemTime>,
    latest_failed: bool,
}

/// What [`JwksKeys::claim_fetch`] says.
enum Claim {
    Claimed,
    /// Another fetch runs: its result will do.
    InFlight,
    /// The last fetch started less than `jwks_min_refetch_s` ago; the next
    /// may start after this long.
    NotDue(Duration),
}

#[derive(Default)]
struct Schedule {
    last_started: Option<Instant>,
    in_flight: bool,
}

/// The `/health` view of the key set (SPEC §11).
#[derive(Debug, Clone, serde::Serialize)]
pub struct JwksHealth {
    /// `ok`, `stale` (the latest fetch failed; the last good set is in
    /// use) or `unavailable` (no set yet).
    pub jwks: &'static str,
    pub keys: usize,
    pub last_fetch: Option<String>,
}

impl std::fmt::Debug for JwksKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksKeys").field("url", &self.url).finish()
    }
}

impl JwksKeys {
    pub fn new(settings: &AuthSettings) -> Self {
        Self {
            url: settings.jwks_url.clone(),
            refresh: Duration::from_secs(settings.jwks_refresh_s),
            min_refetch: Duration::from_secs(settings.jwks_min_refetch_s),
            set: RwLock::new(None),
            removals: AtomicU64::new(0),
            status: Mutex::new(FetchStatus::default()),
            finished: tokio::sync::watch::channel(0).0,
            schedule: Mutex::new(Schedule::default()),
            fetcher: Mutex::new(None),
        }
    }

    /// The set in force; `None` until a first fetch succeeds.
    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.set.read().expect("not poisoned").clone()
    }

    /// Changes whenever a key leaves the set.
    pub fn removals(&self) -> u64 {
        self.removals.load(Ordering::Relaxed)
    }

    pub fn health(&self) -> JwksHealth {
        let status = self.status.lock().expect("not poisoned");
        let keys = self.current().map_or(0, |set| set.len());
        let jwks = match (self.current().is_some(), status.latest_failed) {
            (false, _) => "unavailable",
            (true, true) => "stale",
            (true, false) => "ok",
        };
        JwksHealth {
            jwks,
            keys,
            last_fetch: status
                .last_success
                .map(|at| humantime::format_rfc3339_seconds(at).to_string()),
        }
    }

    /// Claims the next fetch if none runs and the last one started at least
    /// `jwks_min_refetch_s` ago (every fetch counts: start-up, periodic,
    /// refetch).
    fn claim_fetch(&self) -> Claim {
        let mut schedule = self.schedule.lock().expect("not poisoned");
        if schedule.in_flight {
            return Claim::InFlight;
        }
        if let Some(wait) = schedule
            .last_started
            .map(|started| self.min_refetch.saturating_sub(started.elapsed()))
            .filter(|wait| !wait.is_zero())
        {
            return Claim::NotDue(wait);
        }
        schedule.in_flight = true;
        schedule.last_started = Some(Instant::now());
        Claim::Claimed
    }

    /// Takes over what `previous` knew, for the keys of a reload that kept
    /// `jwks_url`: its set (so tokens keep passing while the new fetcher's
    /// first fetch runs), its status, and when it last fetched (so the
    /// reload does not fetch sooner than `jwks_min_refetch_s` allows).
    pub fn inherit(&self, previous: &JwksKeys) {
        if previous.url != self.url {
            return;
        }
        *self.set.write().expect("not poisoned") = previous.current();
        let status = previous.status.lock().expect("not poisoned");
        *self.status.lock().expect("not poisoned") = FetchStatus {
            last_success: status.last_success,
            latest_failed: status.latest_failed,
        };
        self.schedule.lock().expect("not poisoned").last_started =
            previous.schedule.lock().expect("not poisoned").last_started;
    }

    /// For a token whose `kid` the set lacks: asks the fetcher for the set
    /// again, unless a fetch ran within `jwks_min_refetch_s`, and waits for
    /// the fetch under way, if any, [`REFETCH_WAIT`] at most. Every request
    /// that asks while one fetch runs waits on that one fetch.
    pub async fn refetch(&self) {
        let mut finished = self.finished.subscribe();
        match self.claim_fetch() {
            Claim::NotDue(_) => return,
            Claim::InFlight => {}
            Claim::Claimed => {
                let fetcher = self.fetcher.lock().expect("not poisoned").clone();
                match fetcher {
                    Some(fetcher) => fetcher.do_send(Fetch { claimed: true }),
                    None => {
                        self.schedule.lock().expect("not poisoned").in_flight = false;
                        return;
                    }
                }
            }
        }
        let _ = actix_rt::time::timeout(REFETCH_WAIT, finished.changed()).await;
    }

    /// Puts a fetched set in force (or records the failure) and wakes the
    /// requests waiting for it.
    fn fetched(&self, outcome: Result<KeySet, String>) {
        match outcome {
            Ok(set) => {
                let set = Arc::new(set);
                let previous = self.set.write().expect("not poisoned").replace(set.clone());
                let lost_a_key = previous.is_some_and(|previous| previous.loses_keys_in(&set));
                if lost_a_key {
                    self.removals.fetch_add(1, Ordering::Relaxed);
                }
                let mut status = self.status.lock().expect("not poisoned");
                status.last_success = Some(SystemTime::now());
                status.latest_failed = false;
                tracing::debug!(url = %self.url, keys = set.len(), "JWKS fetched");
                crate::metrics::jwks_fetch("success");
            }
            Err(reason) => {
                self.status.lock().expect("not poisoned").latest_failed = true;
                tracing::warn!(url = %self.url, %reason, "JWKS fetch failed; keeping the last good key set");
                crate::metrics::jwks_fetch("failure");
            }
        }
        self.schedule.lock().expect("not poisoned").in_flight = false;
        self.finished.send_modify(|count| *count += 1);
    }
}

/// Fetches its [`JwksKeys`]' set at start, then every `jwks_refresh_s` (or
/// the answer's shorter `Cache-Control: max-age`, never below
/// `jwks_min_refetch_s`), and on request for an unknown `kid`. It stops once
/// nothing else holds the keys (a reload that changed `auth` replaced them).
pub struct JwksFetcher {
    keys: Arc<JwksKeys>,
    client: awc::Client,
    next: Option<actix::SpawnHandle>,
}

/// Fetch now; `claimed`: [`JwksKeys::claim_fetch`] already passed.
#[derive(actix::Message)]
#[rtype(result = "()")]
struct Fetch {
    claimed: bool,
}

impl JwksFetcher {
    /// Starts the fetcher of `keys` on the current arbiter, unless it runs
    /// already (a reload kept the verifier).
    pub fn start_for(keys: &Arc<JwksKeys>, tls: Arc<rustls::ClientConfig>) {
        let mut fetcher = keys.fetcher.lock().expect("not poisoned");
        if fetcher.is_some() {
            return;
        }
        let client = awc::Client::builder()
            .connector(awc::Connector::new().timeout(FETCH_TIMEOUT).rustls_0_23(tls))
            .timeout(FETCH_TIMEOUT)
            .disable_redirects()
            .finish();
        *fetcher = Some(
            Self {
                keys: keys.clone(),
                client,
                next: None,
            }
            .start(),
        );
    }

    fn schedule(&mut self, ctx: &mut Context<Self>, after: Duration) {
        if let Some(next) = self.next.take() {
            ctx.cancel_future(next);
        }
        self.next = Some(ctx.run_later(after, |fetcher, ctx| {
            if Arc::strong_count(&fetcher.keys) == 1 {
                ctx.stop();
                return;
            }
            match fetcher.keys.claim_fetch() {
                Claim::Claimed => ctx.notify(Fetch { claimed: true }),
                // Its end schedules the next one.
                Claim::InFlight => {}
                // A refetch ran moments ago: when allowed.
                Claim::NotDue(wait) => fetcher.schedule(ctx, wait),
            }
        }));
    }
}

impl Actor for JwksFetcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.notify(Fetch { claimed: false });
    }
}

impl Handler<Fetch> for JwksFetcher {
    type Result = actix::ResponseActFuture<Self, ()>;

    fn handle(&mut self, message: Fetch, ctx: &mut Self::Context) -> Self::Result {
        if !message.claimed {
            match self.keys.claim_fetch() {
                Claim::Claimed => {}
                Claim::InFlight => return Box::pin(actix::fut::ready(())),
                // Keys a reload handed over, fetched moments ago.
                Claim::NotDue(wait) => {
                    self.schedule(ctx, wait);
                    return Box::pin(actix::fut::ready(()));
                }
            }
        }
        let request = self
            .client
            .get(self.keys.url.as_str())
            .insert_header(("accept", "application/json"));
        let fetch = async move {
            let mut response = request.send().await.map_err(|err| format!("cannot fetch: {err}"))?;
            if response.status() != awc::http::StatusCode::OK {
                return Err(format!("answered {}", response.status()));
            }
            let max_age = max_age(response.headers());
            let body = response
                .body()
                .limit(MAX_SET_BYTES)
                .await
                .map_err(|err| format!("unreadable body: {err}"))?;
            Ok((KeySet::parse(&body)?, max_age))
        };
        Box::pin(actix::fut::wrap_future(fetch).map(
            |outcome: Result<(KeySet, Option<Duration>), String>, fetcher: &mut Self, ctx| {
                let keys = &fetcher.keys;
                let next = match &outcome {
                    Ok((_, max_age)) => max_age
                        .map_or(keys.refresh, |age| age.min(keys.refresh))
                        .max(keys.min_refetch),
                    // Try again as soon as allowed: the gateway may be waiting
                    // for its first set.
                    Err(_) => keys.min_refetch.max(Duration::from_secs(1)),
                };
                keys.fetched(outcome.map(|(set, _)| set));
                fetcher.schedule(ctx, next);
            },
        ))
    }
}

/// Starts fetching the provider's set of `verifier`, if it has one and its
/// fetcher does not run yet; fetched with the TLS rules of `https://`
/// instances (`upstream.ca_file` included).
pub fn fetch_for(verifier: Option<&Arc<crate::auth::Verifier>>, gateway: &crate::gateway::Gateway) {
    if let Some(keys) = verifier.and_then(|verifier| verifier.jwks()) {
        JwksFetcher::start_for(keys, gateway.upstream_tls.clone());
    }
}

/// `Cache-Control: max-age=N`, if the answer has one.
fn max_age(headers: &awc::http::header::HeaderMap) -> Option<Duration> {
    headers
        .get_all(awc::http::header::CACHE_CONTROL)
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|directive| directive.trim().strip_prefix("max-age="))
        .find_map(|seconds| seconds.trim().parse().ok())
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use jsonwebtoken::{EncodingKey, Validation};
    use serde_json::json;

    /// The RSA public key of RFC 7517, appendix A.1.
    const RFC_RSA_N: &str = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";

    fn rsa(kid: &str, extra: Value) -> Value {
        let mut jwk = json!({ "kty": "RSA", "kid": kid, "n": RFC_RSA_N, "e": "AQAB" });
        jwk.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        jwk
    }

    /// A fresh key pair of `algorithm`'s kind, as its JWK and a signing key.
    fn generated(kid: &str, algorithm: &'static rcgen::SignatureAlgorithm) -> (Value, EncodingKey) {
        let pair = rcgen::KeyPair::generate_for(algorithm).unwrap();
        let raw = pair.public_key_raw();
        let pem = pair.serialize_pem();
        if algorithm == &rcgen::PKCS_ED25519 {
            let jwk = json!({ "kty": "OKP", "crv": "Ed25519", "kid": kid, "x": URL_SAFE_NO_PAD.encode(raw) });
            (jwk, EncodingKey::from_ed_pem(pem.as_bytes()).unwrap())
        } else {
            // An uncompressed point: 0x04, then x and y.
            let half = (raw.len() - 1) / 2;
            let curve = if half == 32 { "P-256" } else { "P-384" };
            let jwk = json!({
                "kty": "EC", "crv": curve, "kid": kid,
                "x": URL_SAFE_NO_PAD.encode(&raw[1..1 + half]),
                "y": URL_SAFE_NO_PAD.encode(&raw[1 + half..]),
            });
            (jwk, EncodingKey::from_ec_pem(pem.as_bytes()).unwrap())
        }
    }

    fn set(keys: Vec<Value>) -> KeySet {
        KeySet::parse(json!({ "keys": keys }).to_string().as_bytes()).unwrap()
    }

    fn header(alg: Algorithm, kid: Option<&str>) -> Header {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        header
    }

    fn chosen(set: &KeySet, alg: Algorithm, kid: Option<&str>) -> &'static str {
        match set.choose(&header(alg, kid)) {
            KeyChoice::Found(_) => "found",
            KeyChoice::UnknownKid => "unknown kid",
            KeyChoice::NoSuitableKey => "no suitable key",
        }
    }

    #[test]
    fn symmetric_encryption_and_unknown_keys_are_left_out_of_a_set() {
        let keys = set(vec![
            rsa("sig", json!({})),
            rsa("sig-stated", json!({ "use": "sig", "alg": "RS256" })),
            rsa("enc", json!({ "use": "enc" })),
            rsa("oaep", json!({ "alg": "RSA-OAEP" })),
            json!({ "kty": "oct", "kid": "secret", "k": "c2VjcmV0" }),
            json!({ "kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA" }),
            json!({ "kty": "weird", "kid": "weird" }),
            json!("not even an object"),
        ]);
        assert_eq!(keys.kids().collect::<Vec<_>>(), ["sig", "sig-stated"]);
        assert_eq!(keys.len(), 2);
    }

    #[test]
    fn what_is_not_a_key_set_is_refused() {
        assert!(KeySet::parse(b"<html>").is_err());
        assert!(KeySet::parse(b"{\"keys\": 5}").is_err());
        assert!(KeySet::parse(b"[]").is_err());
        assert!(KeySet::parse(&vec![b' '; MAX_SET_BYTES + 1]).is_err());
        assert!(KeySet::parse(b"{\"keys\": []}").is_ok_and(|keys| keys.is_empty()));
    }

    #[test]
    fn a_kid_picks_a_key_only_of_the_token_s_family_curve_and_stated_algorithm() {
        let (p256, _) = generated("ec", &rcgen::PKCS_ECDSA_P256_SHA256);
        let (p384, _) = generated("ec384", &rcgen::PKCS_ECDSA_P384_SHA384);
        let (ed, _) = generated("ed", &rcgen::PKCS_ED25519);
        let keys = set(vec![
            rsa("rsa", json!({})),
            rsa("rs256-only", json!({ "alg": "RS256" })),
            p256,
            p384,
            ed,
        ]);
        assert_eq!(chosen(&keys, Algorithm::RS256, Some("rsa")), "found");
        assert_eq!(chosen(&keys, Algorithm::PS512, Some("rsa")), "found");
        assert_eq!(chosen(&keys, Algorithm::RS256, Some("rs256-only")), "found");
        assert_eq!(chosen(&keys, Algorithm::PS256, Some("rs256-only")), "no suitable key");
        assert_eq!(chosen(&keys, Algorithm::ES256, Some("ec")), "found");
        assert_eq!(
            chosen(&keys, Algorithm::ES384, Some("ec")),
            "no suitable key",
            "wrong curve"
        );
        assert_eq!(chosen(&keys, Algorithm::ES384, Some("ec384")), "found");
        assert_eq!(
            chosen(&keys, Algorithm::RS256, Some("ec")),
            "no suitable key",
            "wrong family"
        );
        assert_eq!(chosen(&keys, Algorithm::EdDSA, Some("ed")), "found");
        assert_eq!(chosen(&keys, Algorithm::HS256, Some("rsa")), "no suitable key");
        assert_eq!(chosen(&keys, Algorithm::RS256, Some("gone")), "unknown kid");
    }

    #[test]
    fn without_a_kid_only_a_set_with_exactly_one_key_of_the_kind_answers() {
        let (p256, _) = generated("ec", &rcgen::PKCS_ECDSA_P256_SHA256);
        let one_of_each = set(vec![rsa("rsa", json!({})), p256]);
        assert_eq!(chosen(&one_of_each, Algorithm::RS256, None), "found");
        assert_eq!(chosen(&one_of_each, Algorithm::ES256, None), "found");
        assert_eq!(chosen(&one_of_each, Algorithm::EdDSA, None), "no suitable key");
        let two_rsa = set(vec![rsa("a", json!({})), rsa("b", json!({}))]);
        assert_eq!(chosen(&two_rsa, Algorithm::RS256, None), "no suitable key");
    }

    #[test]
    fn the_chosen_key_verifies_what_its_private_half_signed() {
        for (algorithm, kind) in [
            (Algorithm::ES256, &rcgen::PKCS_ECDSA_P256_SHA256),
            (Algorithm::ES384, &rcgen::PKCS_ECDSA_P384_SHA384),
            (Algorithm::EdDSA, &rcgen::PKCS_ED25519),
        ] {
            let (jwk, signing) = generated("k1", kind);
            let (other, _) = generated("k2", kind);
            let keys = set(vec![jwk, other]);
            let token = jsonwebtoken::encode(
                &header(algorithm, Some("k1")),
                &json!({ "sub": "ada", "exp": jsonwebtoken::get_current_timestamp() + 60 }),
                &signing,
            )
            .unwrap();
            let KeyChoice::Found(key) = keys.choose(&jsonwebtoken::decode_header(&token).unwrap()) else {
                panic!("{algorithm:?}: no key chosen");
            };
            let verified = jsonwebtoken::decode::<Value>(&token, key, &Validation::new(algorithm));
            assert!(verified.is_ok(), "{algorithm:?}: {verified:?}");
            let KeyChoice::Found(wrong) = keys.choose(&header(algorithm, Some("k2"))) else {
                panic!("{algorithm:?}: k2 not chosen");
            };
            assert!(jsonwebtoken::decode::<Value>(&token, wrong, &Validation::new(algorithm)).is_err());
        }
    }
}
