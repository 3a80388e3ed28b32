//! Tokens from an identity provider's JSON Web Key Set (SPEC §11), against
//! a real HTTP server serving the set that the test changes and counts
//! fetches on.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::helpers::*;

/// What the provider answers: a status and a body.
#[derive(Clone)]
struct Answer {
    status: u16,
    body: Vec<u8>,
    cache_control: Option<String>,
}

/// An identity provider on loopback: serves whatever the test sets, and
/// counts the fetches.
struct Provider {
    answer: Arc<Mutex<Answer>>,
    server: RawInstance,
}

impl Provider {
    fn serving(keys: &[Value]) -> Self {
        let answer = Arc::new(Mutex::new(Answer {
            status: 200,
            body: set_of(keys),
            cache_control: None,
        }));
        let current = answer.clone();
        let server = RawInstance::scripted(move |_head, stream| {
            let answer = current.lock().unwrap().clone();
            let cache = answer
                .cache_control
                .map(|value| format!("Cache-Control: {value}\r\n"))
                .unwrap_or_default();
            let _ = write!(
                stream,
                "HTTP/1.1 {} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{cache}Connection: close\r\n\r\n",
                answer.status,
                answer.body.len()
            );
            let _ = stream.write_all(&answer.body);
        });
        Self { answer, server }
    }

    fn url(&self) -> String {
        format!("{}/realms/test/protocol/openid-connect/certs", self.server.url())
    }

    fn fetches(&self) -> usize {
        self.server.requests()
    }

    fn serve(&self, keys: &[Value]) {
        self.answer(200, set_of(keys));
    }

    fn answer(&self, status: u16, body: Vec<u8>) {
        let mut answer = self.answer.lock().unwrap();
        answer.status = status;
        answer.body = body;
    }
}

fn set_of(keys: &[Value]) -> Vec<u8> {
    json!({ "keys": keys }).to_string().into_bytes()
}

/// A signing key and its public JWK under `kid`.
struct Key {
    kid: String,
    algorithm: Algorithm,
    signing: EncodingKey,
    jwk: Value,
}

impl Key {
    fn from_pem(kid: &str, algorithm: Algorithm, private_pem: &str) -> Self {
        let pem = std::fs::read(format!("{}/tests/fixtures/{private_pem}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let signing = match algorithm {
            Algorithm::RS256 | Algorithm::PS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
            _ => EncodingKey::from_ec_pem(&pem).unwrap(),
        };
        Self::with(kid, algorithm, signing)
    }

    fn generated(kid: &str, algorithm: Algorithm) -> Self {
        let kind = match algorithm {
            Algorithm::ES256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Algorithm::ES384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Algorithm::EdDSA => &rcgen::PKCS_ED25519,
            other => panic!("no generated keys for {other:?}"),
        };
        let pair = rcgen::KeyPair::generate_for(kind).unwrap();
        if algorithm == Algorithm::EdDSA {
            let jwk = json!({ "kty": "OKP", "crv": "Ed25519", "kid": kid, "use": "sig",
                              "x": URL_SAFE_NO_PAD.encode(pair.public_key_raw()) });
            let signing = EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap();
            return Self {
                kid: kid.to_owned(),
                algorithm,
                signing,
                jwk,
            };
        }
        Self::with(
            kid,
            algorithm,
            EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
        )
    }

    fn with(kid: &str, algorithm: Algorithm, signing: EncodingKey) -> Self {
        let mut jwk = serde_json::to_value(Jwk::from_encoding_key(&signing, algorithm).unwrap()).unwrap();
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        Self {
            kid: kid.to_owned(),
            algorithm,
            signing,
            jwk,
        }
    }

    fn token(&self, sub: &str) -> String {
        self.token_as(sub, self.algorithm, Some(&self.kid))
    }

    fn token_as(&self, sub: &str, algorithm: Algorithm, kid: Option<&str>) -> String {
        let mut header = Header::new(algorithm);
        header.kid = kid.map(str::to_owned);
        let now = jsonwebtoken::get_current_timestamp();
        jsonwebtoken::encode(
            &header,
            &json!({ "sub": sub, "iat": now, "exp": now + 3600 }),
            &self.signing,
        )
        .unwrap()
    }
}

fn gateway(provider: &Provider, upstream: &Upstream, refresh_s: u64, min_refetch_s: u64) -> TestGateway {
    TestGateway::start(&format!(
        r#"
[auth]
algorithms = ["RS256", "PS256", "ES256", "ES384", "EdDSA"]
jwks_url = "{url}"
jwks_refresh_s = {refresh_s}
jwks_min_refetch_s = {min_refetch_s}
[rate_limit]
global = ""
[services.api]
instances = {api}
[routes.api]
prefix = "/api"
service = "api"
auth = true
"#,
        url = provider.url(),
        api = instances(&[upstream]),
    ))
}

async fn status_with(gateway: &TestGateway, token: &str) -> (u16, String) {
    let reply = read_reply(
        client()
            .get(gateway.url("/api/me"))
            .bearer_auth(token)
            .send()
            .await
            .expect("request reaches the gateway"),
    )
    .await;
    (reply.status, reply.text())
}

async fn wait_for_first_fetch(provider: &Provider) {
    assert!(
        eventually(Duration::from_secs(5), async || provider.fetches() >= 1).await,
        "the gateway never fetched the key set"
    );
    actix_web::rt::time::sleep(Duration::from_millis(50)).await;
}

#[actix_web::test]
async fn rs256_ps256_es256_es384_and_eddsa_tokens_verify_with_the_key_their_kid_names() {
    let keys = [
        Key::from_pem("rsa", Algorithm::RS256, "rsa-test-private.pem"),
        Key::from_pem("rsa-pss", Algorithm::PS256, "rsa-test-private.pem"),
        Key::from_pem("p256", Algorithm::ES256, "ec-p256-test-private.pem"),
        Key::from_pem("p384", Algorithm::ES384, "ec-p384-test-private.pem"),
        Key::generated("ed", Algorithm::EdDSA),
    ];
    let provider = Provider::serving(&keys.iter().map(|key| key.jwk.clone()).collect::<Vec<_>>());
    let upstream = Upstream::start("api");
    let gateway = gateway(&provider, &upstream, 300, 30);
    wait_for_first_fetch(&provider).await;

    for key in &keys {
        let (status, body) = status_with(&gateway, &key.token(&format!("user-{}", key.kid))).await;
        assert_eq!(status, 200, "{:?} token with kid {}: {body}", key.algorithm, key.kid);
        assert_eq!(
            values(&upstream.last_seen(), "x-user-id"),
            [format!("user-{}", key.kid)]
        );
    }
    assert_eq!(provider.fetches(), 1, "every kid was in the first set");

    let health = health(&gateway).await;
    assert_eq!(health["auth"]["jwks"], "ok", "{health}");
    assert_eq!(health["auth"]["keys"], 5, "{health}");
    assert!(health["auth"]["last_fetch"].is_string(), "{health}");
}

#[actix_web::test]
async fn a_rotated_in_key_costs_one_fetch_and_a_flood_of_unknown_kids_at_most_one_per_period() {
    let old = Key::generated("2026-11", Algorithm::ES256);
    let provider = Provider::serving(std::slice::from_ref(&old.jwk));
    let upstream = Upstream::start("api");
    let gateway = gateway(&provider, &upstream, 300, 1);
    wait_for_first_fetch(&provider).await;
    assert_eq!(status_with(&gateway, &old.token("ada")).await.0, 200);
    // Fetches are at least jwks_min_refetch_s apart, the start-up one too.
    actix_web::rt::time::sleep(Duration::from_millis(1100)).await;

    // The provider adds a key and signs with it: the first token naming it
    // makes the gateway fetch once, and passes.
    let new = Key::generated("2026-12", Algorithm::ES256);
    provider.serve(&[old.jwk.clone(), new.jwk.clone()]);
    let (status, body) = status_with(&gateway, &new.token("ada")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(provider.fetches(), 2);

    // 1000 tokens naming kids nobody has, at once: refused, and the set is
    // fetched once at most per jwks_min_refetch_s.
    let started = std::time::Instant::now();
    let forger = Key::generated("forger", Algorithm::ES256);
    let floods = (0..1000).map(|n| {
        let token = forger.token_as("mallory", Algorithm::ES256, Some(&format!("random-{n}")));
        let gateway = &gateway;
        async move { status_with(gateway, &token).await }
    });
    for (status, body) in futures_util::future::join_all(floods).await {
        assert_eq!((status, body.as_str()), (403, r#"{"error":"Invalid token"}"#));
    }
    let periods = started.elapsed().as_secs() as usize + 1;
    assert!(
        provider.fetches() - 2 <= periods,
        "{} fetches for a flood of {:?}",
        provider.fetches() - 2,
        started.elapsed()
    );
}

#[actix_web::test]
async fn a_key_removed_from_the_set_stops_verifying_after_the_next_refresh_cached_tokens_included() {
    let (kept, dropped) = (
        Key::generated("kept", Algorithm::ES256),
        Key::generated("dropped", Algorithm::ES256),
    );
    let provider = Provider::serving(&[kept.jwk.clone(), dropped.jwk.clone()]);
    let upstream = Upstream::start("api");
    let gateway = gateway(&provider, &upstream, 1, 1);
    wait_for_first_fetch(&provider).await;
    let token = dropped.token("ada");
    assert_eq!(status_with(&gateway, &token).await.0, 200);
    assert_eq!(status_with(&gateway, &token).await.0, 200, "now from the token cache");

    provider.serve(std::slice::from_ref(&kept.jwk));
    let fetched = provider.fetches();
    assert!(eventually(Duration::from_secs(5), async || provider.fetches() > fetched).await);
    actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        status_with(&gateway, &token).await.0,
        403,
        "the cached token left with its key"
    );
    assert_eq!(status_with(&gateway, &kept.token("ada")).await.0, 200);
}

#[actix_web::test]
async fn until_a_first_set_loads_tokens_get_503_and_a_bad_answer_later_keeps_the_last_good_set() {
    let key = Key::generated("k", Algorithm::EdDSA);
    let provider = Provider::serving(&[]);
    provider.answer(500, b"down".to_vec());
    let upstream = Upstream::start("api");
    let gateway = gateway(&provider, &upstream, 1, 1);
    wait_for_first_fetch(&provider).await;

    let (status, body) = status_with(&gateway, &key.token("ada")).await;
    assert_eq!(
        (status, body.as_str()),
        (503, r#"{"error":"Authentication unavailable"}"#)
    );
    let report = health(&gateway).await;
    assert_eq!(
        report["auth"],
        json!({ "jwks": "unavailable", "keys": 0, "last_fetch": null })
    );

    // The provider comes back: within a refresh the token passes.
    provider.serve(std::slice::from_ref(&key.jwk));
    assert!(
        eventually(Duration::from_secs(5), async || status_with(
            &gateway,
            &key.token("ada")
        )
        .await
        .0 == 200)
        .await,
        "the key set never loaded"
    );

    // Garbage, a 500 and 2 MiB: the last good set stays in force.
    for (status, body) in [
        (200, b"<html>not a key set</html>".to_vec()),
        (500, b"{}".to_vec()),
        (200, set_of(&vec![key.jwk.clone(); 12_000])),
    ] {
        let fetched = provider.fetches();
        provider.answer(status, body);
        assert!(eventually(Duration::from_secs(5), async || provider.fetches() > fetched).await);
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(status_with(&gateway, &key.token("ada")).await.0, 200);
        assert_eq!(health(&gateway).await["auth"]["jwks"], "stale");
    }
}

#[actix_web::test]
async fn key_confusion_attempts_are_refused() {
    let rsa = Key::from_pem("rsa", Algorithm::RS256, "rsa-test-private.pem");
    let ec = Key::generated("ec", Algorithm::ES256);
    let oct =
        json!({ "kty": "oct", "kid": "shared", "k": URL_SAFE_NO_PAD.encode(b"a-shared-secret-of-32-bytes-long!") });
    let provider = Provider::serving(&[rsa.jwk.clone(), ec.jwk.clone(), oct]);
    let upstream = Upstream::start("api");
    let gateway = gateway(&provider, &upstream, 300, 30);
    wait_for_first_fetch(&provider).await;
    let now = jsonwebtoken::get_current_timestamp();
    let claims = json!({ "sub": "mallory", "exp": now + 3600 });

    // HS256 signed with the RSA key's modulus, naming the RSA key.
    let modulus = URL_SAFE_NO_PAD.decode(rsa.jwk["n"].as_str().unwrap()).unwrap();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa".into());
    let hs_with_modulus = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&modulus)).unwrap();
    // HS256 naming the set's symmetric key, signed with it.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("shared".into());
    let hs_with_oct = jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(b"a-shared-secret-of-32-bytes-long!"),
    )
    .unwrap();
    // A token carrying its own key, signed with the matching private key.
    let attacker = Key::generated("attacker", Algorithm::ES256);
    let mut header = Header::new(Algorithm::ES256);
    header.jwk = Some(serde_json::from_value(attacker.jwk.clone()).unwrap());
    header.jku = Some("http://127.0.0.1:9/keys".into());
    let own_key = jsonwebtoken::encode(&header, &claims, &attacker.signing).unwrap();
    // The EC key named by an RS256 token (signed with the RSA key).
    let wrong_family = rsa.token_as("mallory", Algorithm::RS256, Some("ec"));

    for (what, token) in [
        ("HS256 with the modulus", hs_with_modulus),
        ("HS256 with an oct key of the set", hs_with_oct),
        ("its own jwk and jku", own_key),
        ("an ES256 key for an RS256 token", wrong_family),
    ] {
        let (status, body) = status_with(&gateway, &token).await;
        assert_eq!((status, body.as_str()), (403, r#"{"error":"Invalid token"}"#), "{what}");
    }
    assert_eq!(upstream.hits(), 0);
    assert_eq!(
        status_with(&gateway, &rsa.token("ada")).await.0,
        200,
        "the real key still works"
    );
}

#[actix_web::test]
async fn the_jwks_url_must_be_http_and_fetches_no_more_often_than_refreshes() {
    let base = "[services.api]\ninstances = [\"http://127.0.0.1:9\"]\n[routes.api]\nprefix = \"/api\"\nservice = \"api\"\nauth = true\n";
    let found = problems(&format!(
        "[auth]\nalgorithms = [\"RS256\"]\njwks_url = \"ftp://idp.example/keys\"\njwks_refresh_s = 10\njwks_min_refetch_s = 60\n{base}"
    ));
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("auth.jwks_url: \"ftp://idp.example/keys\" is not an http:// or https:// URL")),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("auth.jwks_min_refetch_s: 60 is longer than auth.jwks_refresh_s (10)")),
        "{found:?}"
    );
    // With a key set, RS256 needs no key file.
    let dir = settings_dir(&format!(
        "[auth]\nalgorithms = [\"RS256\", \"ES256\"]\njwks_url = \"https://idp.example/keys\"\n{base}"
    ));
    let settings = load_settings(dir.path());
    assert!(
        gatehouse::gateway::compile(&settings).is_ok(),
        "check-config does not fetch"
    );
}

#[actix_web::test]
async fn a_reload_that_changes_the_jwks_url_fetches_from_the_new_provider() {
    let (first_key, second_key) = (
        Key::generated("a", Algorithm::ES256),
        Key::generated("b", Algorithm::ES256),
    );
    let first = Provider::serving(std::slice::from_ref(&first_key.jwk));
    let second = Provider::serving(std::slice::from_ref(&second_key.jwk));
    let upstream = Upstream::start("api");
    let gateway = gateway(&first, &upstream, 300, 30);
    wait_for_first_fetch(&first).await;
    assert_eq!(status_with(&gateway, &first_key.token("ada")).await.0, 200);

    let settings = std::fs::read_to_string(gateway.settings_file()).unwrap();
    std::fs::write(gateway.settings_file(), settings.replace(&first.url(), &second.url())).unwrap();
    gateway.reload().await.expect("the reload succeeds");
    wait_for_first_fetch(&second).await;
    assert_eq!(status_with(&gateway, &second_key.token("ada")).await.0, 200);
    assert_eq!(
        status_with(&gateway, &first_key.token("ada")).await.0,
        403,
        "the old provider's key is gone"
    );
}

#[actix_web::test]
async fn a_key_replaced_under_the_same_kid_takes_its_cached_tokens_with_it() {
    let (before, after) = (
        Key::generated("k", Algorithm::ES256),
        Key::generated("k", Algorithm::ES256),
    );
    let provider = Provider::serving(std::slice::from_ref(&before.jwk));
    let upstream = Upstream::start("api");
    let gateway = gateway(&provider, &upstream, 1, 1);
    wait_for_first_fetch(&provider).await;
    let token = before.token("ada");
    assert_eq!(status_with(&gateway, &token).await.0, 200);
    assert_eq!(status_with(&gateway, &token).await.0, 200, "now from the token cache");

    provider.serve(std::slice::from_ref(&after.jwk));
    let fetched = provider.fetches();
    assert!(eventually(Duration::from_secs(5), async || provider.fetches() > fetched).await);
    actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(status_with(&gateway, &token).await.0, 403, "the replaced key's token");
    assert_eq!(status_with(&gateway, &after.token("ada")).await.0, 200);
}

#[actix_web::test]
async fn a_reload_that_keeps_the_provider_keeps_its_key_set_while_the_provider_is_down() {
    let key = Key::generated("k", Algorithm::EdDSA);
    let provider = Provider::serving(std::slice::from_ref(&key.jwk));
    let upstream = Upstream::start("api");
    let gateway = gateway(&provider, &upstream, 300, 30);
    wait_for_first_fetch(&provider).await;
    assert_eq!(status_with(&gateway, &key.token("ada")).await.0, 200);

    // The provider goes down; a reload changes another auth key.
    provider.answer(500, b"down".to_vec());
    let settings = std::fs::read_to_string(gateway.settings_file()).unwrap();
    let changed = settings.replace("[auth]\n", "[auth]\nleeway_s = 5\n");
    assert_ne!(changed, settings, "the reload changes auth, so it builds new keys");
    std::fs::write(gateway.settings_file(), changed).unwrap();
    gateway.reload().await.expect("the reload succeeds");
    let (status, body) = status_with(&gateway, &key.token("bob")).await;
    assert_eq!(status, 200, "the set in force carries over: {body}");
    assert_eq!(
        provider.fetches(),
        1,
        "and the reload fetches no sooner than jwks_min_refetch_s allows"
    );
    assert_eq!(health(&gateway).await["auth"]["jwks"], "ok");
}
