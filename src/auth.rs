//! JWT verification (SPEC §3 step 5), built once at start-up.
//!
//! The token's `alg` header only ever *selects among* the algorithms listed in
//! `auth.algorithms`; the key is then chosen by that algorithm's family, so an
//! HS token is never checked against a public key nor the reverse (the classic
//! key-confusion attack), and `alg: none` cannot even be expressed. `jku`,
//! `x5u`, `x5c` and embedded `jwk` headers are ignored: no key is ever fetched
//! from where a token says. With `auth.jwks_url`, a token's `kid` picks a key
//! of the provider's set ([`crate::jwks`]), which must suit its `alg`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

use crate::jwks::{JwksKeys, KeyChoice};
use crate::settings::{is_hmac, AuthSettings};

/// The authenticated caller, sent upstream as `X-User-Id` / `X-User-Roles`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub subject: String,
    pub roles: Vec<String>,
}

impl Identity {
    /// A route's `roles` need any one of them.
    pub fn has_any_role(&self, required: &[String]) -> bool {
        required.is_empty() || required.iter().any(|role| self.roles.contains(role))
    }
}

/// Why a token was refused; the client only ever sees "Invalid token".
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("algorithm {0:?} is not accepted")]
    AlgorithmNotAccepted(Algorithm),
    #[error("{0}")]
    Jwt(#[from] jsonwebtoken::errors::Error),
    #[error("claim `sub` must be a non-empty string")]
    MissingSubject,
    /// A control character could not travel in an `X-User-*` header.
    #[error("claim `{0}` holds a control character")]
    ControlCharacter(&'static str),
    /// The token needs a key of the provider's set, and none is loaded yet.
    #[error("no key set loaded from auth.jwks_url yet")]
    KeysUnavailable,
    /// The token's `kid` is not in the set (a refetch may bring it).
    #[error("no key {0:?} in the key set")]
    UnknownKid(String),
    #[error("no key of the key set suits this token")]
    NoSuitableKey,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("auth.public_key_pem: cannot read {path:?}: {source}")]
    Unreadable { path: String, source: std::io::Error },
    /// The file was read but holds no public key the algorithms can use:
    /// `found` says what it holds, `expected` what they need.
    #[error("auth.public_key_pem: {path}: {found}: expected {expected}")]
    Unusable {
        path: String,
        found: &'static str,
        expected: String,
    },
    #[error("auth.public_key_pem: one key cannot serve {0}")]
    MixedFamilies(String),
    #[error("{0}")]
    MissingSecret(String),
}

/// Checks tokens against the configured keys; cheap to share.
pub struct Verifier {
    /// Per accepted algorithm: its configured key (the secret, or the
    /// `public_key_pem` key; `None` when only the provider's set has keys
    /// for it) and its validation rules.
    accepted: HashMap<Algorithm, (Option<DecodingKey>, Validation)>,
    /// The provider's key set, with `auth.jwks_url`.
    jwks: Option<Arc<JwksKeys>>,
    roles_claim: String,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.accepted.keys().collect::<Vec<_>>())
            .field("roles_claim", &self.roles_claim)
            .finish()
    }
}

fn key_family(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => "HMAC",
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => "RSA",
        Algorithm::PS256 | Algorithm::PS384 | Algorithm::PS512 => "RSA",
        Algorithm::ES256 | Algorithm::ES384 => "EC",
        Algorithm::EdDSA => "Ed25519",
    }
}

impl Verifier {
    /// Parses the keys once; a missing or bad key names its setting.
    pub fn new(settings: &AuthSettings) -> Result<Self, KeyError> {
        let public_families: Vec<&'static str> = {
            let mut families: Vec<_> = settings
                .algorithms
                .iter()
                .filter(|alg| !is_hmac(**alg))
                .map(|alg| key_family(*alg))
                .collect();
            families.sort_unstable();
            families.dedup();
            families
        };
        // A key set holds keys of any family; one key file, one family.
        let jwks = (!settings.jwks_url.is_empty()).then(|| Arc::new(JwksKeys::new(settings)));
        let reads_key_file = jwks.is_none() || !settings.public_key_pem.is_empty();
        if public_families.len() > 1 && reads_key_file {
            return Err(KeyError::MixedFamilies(public_families.join(" and ")));
        }
        let public_key = match public_families.first() {
            Some(family) if reads_key_file => {
                Some(read_public_key(&settings.public_key_pem, family, &settings.algorithms)?)
            }
            _ => None,
        };

        if let Some(problem) = settings.missing_secret() {
            return Err(KeyError::MissingSecret(problem));
        }
        let mut accepted = HashMap::new();
        for &algorithm in &settings.algorithms {
            let key = if is_hmac(algorithm) {
                Some(DecodingKey::from_secret(settings.jwt_secret.expose().as_bytes()))
            } else {
                public_key.clone()
            };
            accepted.insert(algorithm, (key, validation_for(algorithm, settings)));
        }
        Ok(Self {
            accepted,
            jwks,
            roles_claim: settings.roles_claim.clone(),
        })
    }

    /// The provider's key set, when `auth.jwks_url` is set.
    pub fn jwks(&self) -> Option<&Arc<JwksKeys>> {
        self.jwks.as_ref()
    }

    /// Verifies signature, algorithm, `exp` (required), `nbf`, `iss`, `aud`,
    /// and reads `sub` and the roles claim.
    pub fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        self.verify_window(token).map(|(identity, _)| identity)
    }

    /// [`Verifier::verify`], and the seconds during which the token is
    /// accepted (when `exp`, and `nbf` if present, are integers). The other
    /// checks do not depend on the time.
    pub fn verify_window(&self, token: &str) -> Result<(Identity, Option<Window>), TokenError> {
        let set;
        let (key, validation) = if self.accepted.len() == 1 && self.jwks.is_none() {
            // `decode` itself refuses any other `alg`: reading the header
            // here as well would parse it a third time per request.
            let (key, validation) = self.accepted.values().next().expect("one entry");
            (
                key.as_ref().expect("without a key set every algorithm has its key"),
                validation,
            )
        } else {
            let header = jsonwebtoken::decode_header(token)?;
            let (configured, validation) = self
                .accepted
                .get(&header.alg)
                .ok_or(TokenError::AlgorithmNotAccepted(header.alg))?;
            // An HMAC secret whatever the `kid`; the key file for a token
            // without one; else the provider's set.
            let key = match (configured, &self.jwks) {
                (Some(key), _) if is_hmac(header.alg) || header.kid.is_none() => key,
                (_, Some(jwks)) => {
                    set = jwks.current().ok_or(TokenError::KeysUnavailable)?;
                    match set.choose(&header) {
                        KeyChoice::Found(key) => key,
                        KeyChoice::UnknownKid => {
                            return Err(TokenError::UnknownKid(header.kid.clone().unwrap_or_default()))
                        }
                        KeyChoice::NoSuitableKey => return Err(TokenError::NoSuitableKey),
                    }
                }
                (Some(key), None) => key,
                (None, None) => return Err(TokenError::NoSuitableKey),
            };
            (key, validation)
        };
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, key, validation)?.claims;
        let subject = match claims.get("sub") {
            Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
            _ => return Err(TokenError::MissingSubject),
        };
        let roles: Vec<String> = match roles_claim(&claims, &self.roles_claim) {
            Some(Value::String(role)) => vec![role.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        // The identity goes upstream as header values: refuse what could not
        // be sent rather than forward a request without it.
        if subject.chars().any(char::is_control) {
            return Err(TokenError::ControlCharacter("sub"));
        }
        if roles.iter().any(|role| role.chars().any(char::is_control)) {
            return Err(TokenError::ControlCharacter("roles"));
        }
        let leeway = validation.leeway;
        let from = match claims.get("nbf") {
            None => Some(0),
            Some(nbf) => nbf.as_u64().map(|nbf| nbf.saturating_sub(leeway)),
        };
        let until = claims
            .get("exp")
            .and_then(Value::as_u64)
            .map(|exp| exp.saturating_add(leeway));
        let window = from.zip(until).map(|(from, until)| Window { from, until });
        Ok((Identity { subject, roles }, window))
    }
}

/// The roles claim: `name` itself, or, when the token has no claim of that
/// name and it contains dots, the claim the dotted path leads to
/// (`realm_access.roles`, as Keycloak nests them). A namespaced claim
/// (`https://example.com/roles`, as Auth0 names them) is found whole first.
fn roles_claim<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    claims.get(name).or_else(|| {
        let mut path = name.split('.');
        let first = claims.get(path.next()?)?;
        path.try_fold(first, |value, step| value.as_object()?.get(step))
    })
}

/// The Unix seconds, both ends included, during which a token is accepted:
/// jsonwebtoken's rules (`nbf` no later than now + leeway, `exp` no earlier
/// than now − leeway) turned around.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from: u64,
    pub until: u64,
}

impl Window {
    pub fn contains(&self, now: u64) -> bool {
        (self.from..=self.until).contains(&now)
    }
}

/// Verified tokens kept by one HTTP worker until they expire.
///
/// A client sends the same token with every request of its lifetime, and
/// verifying it (jsonwebtoken parses the header twice and the claims twice,
/// then checks the signature) is most of what auth costs a request. Only a
/// byte-identical token hits, so the signature is part of the key; `exp` and
/// `nbf` are checked again on every hit with the verifier's rules (its
/// [`Window`]); `iss`, `aud`, the algorithm and the keys cannot change for a
/// token that passed once. Bounded: at most
/// [`TokenCache::ENTRIES`] tokens of at most [`TokenCache::MAX_TOKEN_BYTES`]
/// each, and emptied when full.
#[derive(Default)]
pub struct TokenCache {
    verified: RefCell<HashMap<Box<str>, (Identity, Window)>>,
    /// The key set's [`JwksKeys::removals`] when the cache was last
    /// emptied: a key that left the set takes its tokens with it.
    removals_seen: Cell<u64>,
}

impl TokenCache {
    pub const ENTRIES: usize = 1024;
    pub const MAX_TOKEN_BYTES: usize = 2048;

    pub fn verify(&self, verifier: &Verifier, token: &str) -> Result<Identity, TokenError> {
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(jwks) = verifier.jwks() {
            let removals = jwks.removals();
            if removals != self.removals_seen.get() {
                self.verified.borrow_mut().clear();
                self.removals_seen.set(removals);
            }
        }
        if let Some((identity, window)) = self.verified.borrow().get(token) {
            if window.contains(now) {
                return Ok(identity.clone());
            }
        }
        match verifier.verify_window(token) {
            Ok((identity, Some(window))) if token.len() <= Self::MAX_TOKEN_BYTES => {
                let mut verified = self.verified.borrow_mut();
                if verified.len() >= Self::ENTRIES {
                    verified.clear();
                }
                verified.insert(token.into(), (identity.clone(), window));
                Ok(identity)
            }
            Ok((identity, _)) => Ok(identity),
            Err(error) => {
                self.verified.borrow_mut().remove(token);
                Err(error)
            }
        }
    }
}

fn read_public_key(path: &str, family: &'static str, algorithms: &[Algorithm]) -> Result<DecodingKey, KeyError> {
    let pem = std::fs::read(path).map_err(|source| KeyError::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    let unusable = |found| KeyError::Unusable {
        path: path.to_owned(),
        found,
        expected: expected_key(family, algorithms),
    };
    // jsonwebtoken would also accept a private key here; the gateway only
    // ever needs, and should only ever hold, the public half.
    let text = String::from_utf8_lossy(&pem);
    if !text.contains("PUBLIC KEY-----") {
        return Err(unusable(if text.contains("PRIVATE KEY-----") {
            "holds a private key, not a public key"
        } else if text.contains("-----BEGIN CERTIFICATE-----") {
            "holds a certificate, not a public key (`openssl x509 -pubkey -noout` extracts it)"
        } else {
            "not a PEM public key"
        }));
    }
    if let Ok(key) = parse_public_pem(family, &pem) {
        return Ok(key);
    }
    // Say what the file holds instead, when it is a key of another family.
    let other = ["RSA", "EC", "Ed25519"]
        .into_iter()
        .find(|other| *other != family && parse_public_pem(other, &pem).is_ok());
    let found = match other {
        Some("RSA") => "holds an RSA public key",
        Some("EC") => "holds an EC public key",
        Some(_) => "holds an Ed25519 public key",
        None => "not a readable PEM public key",
    };
    Err(unusable(found))
}

fn parse_public_pem(family: &str, pem: &[u8]) -> jsonwebtoken::errors::Result<DecodingKey> {
    match family {
        "RSA" => DecodingKey::from_rsa_pem(pem),
        "EC" => DecodingKey::from_ec_pem(pem),
        _ => DecodingKey::from_ed_pem(pem),
    }
}

/// What a public-key file must hold for `algorithms` (of one `family`), as the
/// PEM header an operator can look for.
fn expected_key(family: &str, algorithms: &[Algorithm]) -> String {
    let public: Vec<Algorithm> = algorithms.iter().copied().filter(|alg| !is_hmac(*alg)).collect();
    let kind = match (family, public.as_slice()) {
        ("RSA", _) => "an RSA public key (BEGIN PUBLIC KEY or BEGIN RSA PUBLIC KEY)",
        ("EC", [Algorithm::ES256]) => "an EC P-256 public key (BEGIN PUBLIC KEY)",
        ("EC", [Algorithm::ES384]) => "an EC P-384 public key (BEGIN PUBLIC KEY)",
        ("EC", _) => "an EC public key (BEGIN PUBLIC KEY)",
        _ => "an Ed25519 public key (BEGIN PUBLIC KEY)",
    };
    let names: Vec<String> = public.iter().map(|alg| format!("{alg:?}")).collect();
    format!("{kind} for {}", names.join("/"))
}

fn validation_for(algorithm: Algorithm, settings: &AuthSettings) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = settings.leeway_s;
    validation.validate_exp = true;
    // Off by default in jsonwebtoken; the spec honours `nbf`.
    validation.validate_nbf = true;
    let mut required = vec!["exp"];
    if settings.issuer.is_empty() {
        validation.iss = None;
    } else {
        validation.set_issuer(&[&settings.issuer]);
        required.push("iss");
    }
    if settings.audience.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&[&settings.audience]);
        required.push("aud");
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// `gatehouse token`: signs with the configured secret and the first HS
/// algorithm of `auth.algorithms`.
pub fn mint_token(settings: &AuthSettings, subject: &str, roles: &[String], ttl_s: u64) -> Result<String, String> {
    let algorithm = settings
        .algorithms
        .iter()
        .copied()
        .find(|alg| is_hmac(*alg))
        .ok_or("auth.algorithms: no HS algorithm is configured, so gatehouse cannot sign tokens")?;
    if settings.jwt_secret.is_empty() {
        return Err("auth.jwt_secret: no secret is set (JWT_SECRET or auth.jwt_secret)".to_owned());
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|err| err.to_string())?
        .as_secs();
    let mut claims = Map::new();
    claims.insert("sub".to_owned(), subject.into());
    claims.insert("iat".to_owned(), now.into());
    claims.insert("exp".to_owned(), (now + ttl_s).into());
    if !settings.issuer.is_empty() {
        claims.insert("iss".to_owned(), settings.issuer.clone().into());
    }
    if !settings.audience.is_empty() {
        claims.insert("aud".to_owned(), settings.audience.clone().into());
    }
    match roles {
        [] => {}
        [role] => {
            claims.insert(settings.roles_claim.clone(), role.clone().into());
        }
        many => {
            claims.insert(settings.roles_claim.clone(), many.to_vec().into());
        }
    }
    jsonwebtoken::encode(
        &Header::new(algorithm),
        &claims,
        &EncodingKey::from_secret(settings.jwt_secret.expose().as_bytes()),
    )
    .map_err(|err| err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Secret;

    fn hs_settings() -> AuthSettings {
        AuthSettings {
            jwt_secret: Secret::new("a-test-secret-of-at-least-32-bytes-long"),
            ..AuthSettings::default()
        }
    }

    #[test]
    fn minted_tokens_verify_with_their_roles() {
        let settings = hs_settings();
        let verifier = Verifier::new(&settings).unwrap();
        let one = mint_token(&settings, "u1", &["admin".to_owned()], 60).unwrap();
        assert_eq!(
            verifier.verify(&one).unwrap(),
            Identity {
                subject: "u1".into(),
                roles: vec!["admin".into()]
            }
        );
        let many = mint_token(&settings, "u2", &["a".to_owned(), "b".to_owned()], 60).unwrap();
        assert_eq!(verifier.verify(&many).unwrap().roles, vec!["a", "b"]);
        let none = mint_token(&settings, "u3", &[], 60).unwrap();
        assert!(verifier.verify(&none).unwrap().roles.is_empty());
    }

    #[test]
    fn a_comma_in_a_role_is_part_of_one_role() {
        let identity = Identity {
            subject: "u".into(),
            roles: vec!["user,admin".into()],
        };
        assert!(!identity.has_any_role(&["admin".to_owned()]));
        assert!(identity.has_any_role(&["user,admin".to_owned()]));
        assert!(identity.has_any_role(&[]));
    }

    #[test]
    fn algorithms_not_configured_are_refused() {
        let settings = hs_settings();
        let verifier = Verifier::new(&settings).unwrap();
        let hs384 = AuthSettings {
            algorithms: vec![Algorithm::HS384],
            ..hs_settings()
        };
        let token = mint_token(&hs384, "u", &[], 60).unwrap();
        // One accepted algorithm: jsonwebtoken's own check refuses it.
        assert!(matches!(
            verifier.verify(&token),
            Err(TokenError::Jwt(error)) if *error.kind() == jsonwebtoken::errors::ErrorKind::InvalidAlgorithm
        ));
        // Several: the header selects among them, and HS384 is not one.
        let several = Verifier::new(&AuthSettings {
            algorithms: vec![Algorithm::HS256, Algorithm::HS512],
            ..hs_settings()
        })
        .unwrap();
        assert!(matches!(
            several.verify(&token),
            Err(TokenError::AlgorithmNotAccepted(Algorithm::HS384))
        ));
    }

    #[test]
    fn the_acceptance_window_is_nbf_minus_leeway_through_exp_plus_leeway() {
        let settings = AuthSettings {
            leeway_s: 7,
            ..hs_settings()
        };
        let verifier = Verifier::new(&settings).unwrap();
        let token = mint_token(&settings, "u", &[], 60).unwrap();
        let (_, window) = verifier.verify_window(&token).unwrap();
        let window = window.expect("integer exp, no nbf");
        let now = jsonwebtoken::get_current_timestamp();
        assert_eq!(window.from, 0, "no nbf: no lower bound");
        assert!((now + 60 + 7).abs_diff(window.until) <= 1, "{window:?}");

        let window = Window { from: 10, until: 20 };
        assert!(!window.contains(9) && window.contains(10) && window.contains(20) && !window.contains(21));
    }

    #[test]
    fn the_token_cache_serves_tokens_only_inside_their_window() {
        let settings = hs_settings();
        let verifier = Verifier::new(&settings).unwrap();
        let cache = TokenCache::default();
        let token = mint_token(&settings, "u", &["r".to_owned()], 60).unwrap();
        let identity = cache.verify(&verifier, &token).unwrap();
        assert_eq!(cache.verified.borrow().len(), 1);
        assert_eq!(cache.verify(&verifier, &token).unwrap(), identity);

        // A hit does not verify again: an entry planted for a string that is
        // no token is served while its window holds...
        let now = jsonwebtoken::get_current_timestamp();
        let planted = "not.a.token";
        let mallory = Identity {
            subject: "mallory".into(),
            roles: vec!["admin".into()],
        };
        let window = Window {
            from: now,
            until: now + 60,
        };
        cache
            .verified
            .borrow_mut()
            .insert(planted.into(), (mallory.clone(), window));
        assert_eq!(cache.verify(&verifier, planted).unwrap(), mallory);

        // ...and outside it, before or after, is verified again (and fails,
        // and is dropped).
        for window in [
            Window {
                from: now + 5,
                until: now + 60,
            },
            Window {
                from: 0,
                until: now - 1,
            },
        ] {
            cache
                .verified
                .borrow_mut()
                .insert(planted.into(), (mallory.clone(), window));
            assert!(cache.verify(&verifier, planted).is_err(), "{window:?}");
            assert!(!cache.verified.borrow().contains_key(planted), "{window:?}");
        }

        // Refused tokens are never kept.
        assert!(cache.verify(&verifier, "still.not.valid").is_err());
        assert_eq!(cache.verified.borrow().len(), 1);
    }

    #[test]
    fn the_token_cache_stays_bounded() {
        let settings = hs_settings();
        let verifier = Verifier::new(&settings).unwrap();
        let cache = TokenCache::default();
        for n in 0..=TokenCache::ENTRIES {
            let token = mint_token(&settings, &format!("u{n}"), &[], 60).unwrap();
            cache.verify(&verifier, &token).unwrap();
        }
        assert!(cache.verified.borrow().len() <= TokenCache::ENTRIES);

        // A token of exactly the limit is kept, one byte more is not.
        let mut subject = String::from("s");
        let at_limit = loop {
            let token = mint_token(&settings, &subject, &[], 60).unwrap();
            if token.len() >= TokenCache::MAX_TOKEN_BYTES {
                break token;
            }
            subject.push('s');
        };
        cache.verified.borrow_mut().clear();
        cache.verify(&verifier, &at_limit).unwrap();
        let kept = cache.verified.borrow().contains_key(at_limit.as_str());
        assert_eq!(
            kept,
            at_limit.len() == TokenCache::MAX_TOKEN_BYTES,
            "{} bytes",
            at_limit.len()
        );
        let long = mint_token(&settings, &"s".repeat(TokenCache::MAX_TOKEN_BYTES), &[], 60).unwrap();
        cache.verify(&verifier, &long).unwrap();
        assert!(!cache.verified.borrow().contains_key(long.as_str()), "too long to keep");
    }
}
