//! JWT bearer auth (SPEC §3 step 5), the start-up refusals that guard it
//! (SPEC §2) and `gatehouse token` (SPEC §1), as a client and an operator
//! see them.
//!
//! Tokens are signed here with `jsonwebtoken`, or built by hand (base64url
//! JSON) where it will not build the bad token a test needs. Public keys are
//! the test-only fixtures in `tests/fixtures/`.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use gatehouse::settings::{ConfigError, Settings, Sources};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{json, Value};

use crate::helpers::*;

/// 46 bytes, comfortably above the 32-byte minimum.
const SECRET: &str = "gatehouse-integration-test-secret-0123456789ab";
const OTHER_SECRET: &str = "a-different-secret-that-is-also-long-enough-42";
const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "gatehouse-tests";

const TOKEN_REQUIRED: &str = r#"{"error":"Access token required"}"#;
const INVALID_TOKEN: &str = r#"{"error":"Invalid token"}"#;
const INSUFFICIENT_PERMISSIONS: &str = r#"{"error":"Insufficient permissions"}"#;

// ---------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap_or_else(|err| panic!("fixture {name}: {err}"))
}

/// `sub` and an `exp` an hour away.
fn valid(sub: &str) -> Value {
    json!({ "sub": sub, "iat": now(), "exp": now() + 3600 })
}

/// `claims` with `key` set to `value` (which may be `null`).
fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

fn sign(algorithm: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(algorithm), claims, key).expect("the test token is signed")
}

/// Signed with the gateway's secret.
fn hs256(claims: &Value) -> String {
    sign(Algorithm::HS256, &EncodingKey::from_secret(SECRET.as_bytes()), claims)
}

fn rsa_private() -> EncodingKey {
    EncodingKey::from_rsa_pem(&fixture_bytes("rsa-test-private.pem")).unwrap()
}

fn ec_private(name: &str) -> EncodingKey {
    EncodingKey::from_ec_pem(&fixture_bytes(name)).unwrap()
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

/// `header.payload.` with an empty signature.
fn unsigned(header: Value, claims: &Value) -> String {
    format!("{}.{}.", b64(&header), b64(claims))
}

/// `token` with its payload replaced and its signature kept.
fn tampered(token: &str, claims: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!("{}.{}.{}", parts[0], b64(claims), parts[2])
}

/// `token` without its signature.
fn stripped(token: &str) -> String {
    let (signed_part, _) = token.rsplit_once('.').unwrap();
    format!("{signed_part}.")
}

// ---------------------------------------------------------------------------
// Gateways and requests
// ---------------------------------------------------------------------------

/// One service `api` behind `/api/users` (auth), `/api/admin` (role admin)
/// and `/api/public` (no auth), with the `[auth]` lines given.
fn auth_gateway(upstream: &Upstream, auth: &str) -> TestGateway {
    TestGateway::start(&format!(
        r#"
[auth]
{auth}

[services.api]
instances = {instances}

[routes.users]
prefix = "/api/users"
service = "api"
auth = true

[routes.admin]
prefix = "/api/admin"
service = "api"
roles = ["admin"]

[routes.public]
prefix = "/api/public"
service = "api"
"#,
        instances = instances(&[upstream]),
    ))
}

fn hs256_auth() -> String {
    format!("jwt_secret = \"{SECRET}\"\nleeway_s = 30")
}

fn public_key_auth(algorithms: &str, public_key: &str) -> String {
    format!(
        "algorithms = {algorithms}\npublic_key_pem = {:?}\nleeway_s = 30",
        fixture(public_key)
    )
}

fn bearer(token: &str) -> Vec<(&'static str, String)> {
    vec![("authorization", format!("Bearer {token}"))]
}

async fn send(gateway: &TestGateway, path: &str, headers: &[(&'static str, String)]) -> Reply {
    let mut request = client().get(gateway.url(path));
    for (name, value) in headers {
        request = request.append_header((*name, value.as_str()));
    }
    read_reply(request.send().await.expect("the gateway answers")).await
}

/// What the client must see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// 200 from the upstream, which saw the request.
    Proxied,
    /// 401 `Access token required` with `WWW-Authenticate: Bearer`.
    TokenRequired,
    /// 403 `Invalid token`.
    InvalidToken,
    /// 403 `Insufficient permissions`.
    InsufficientPermissions,
}
use Outcome::*;

struct Case {
    what: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    expect: Outcome,
}

fn case(what: &'static str, path: &str, headers: Vec<(&'static str, String)>, expect: Outcome) -> Case {
    Case {
        what,
        path: path.to_owned(),
        headers,
        expect,
    }
}

/// Sends every case and reports every mismatch at once.
async fn check_cases(gateway: &TestGateway, upstream: &Upstream, cases: &[Case]) {
    let mut failures = Vec::new();
    for case in cases {
        let hits_before = upstream.hits();
        let reply = send(gateway, &case.path, &case.headers).await;
        let upstream_hits = upstream.hits() - hits_before;
        let problems = mismatches(&reply, case.expect, upstream_hits);
        if !problems.is_empty() {
            failures.push(format!(
                "{} (GET {}, expected {:?}): got {} {:?}: {}",
                case.what,
                case.path,
                case.expect,
                reply.status,
                reply.text(),
                problems.join("; ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n  {}",
        failures.len(),
        cases.len(),
        failures.join("\n  ")
    );
}

fn mismatches(reply: &Reply, expect: Outcome, upstream_hits: usize) -> Vec<String> {
    let mut problems = Vec::new();
    let (status, body) = match expect {
        Proxied => (200, None),
        TokenRequired => (401, Some(TOKEN_REQUIRED)),
        InvalidToken => (403, Some(INVALID_TOKEN)),
        InsufficientPermissions => (403, Some(INSUFFICIENT_PERMISSIONS)),
    };
    if reply.status != status {
        problems.push(format!("status should be {status}"));
    }
    match body {
        None => {
            if upstream_hits != 1 || reply.header("x-upstream-instance") != Some("api") {
                problems.push(format!("the upstream should answer (it saw {upstream_hits} requests)"));
            }
        }
        Some(body) => {
            if reply.text() != body {
                problems.push(format!("body should be {body}"));
            }
            if reply.header("content-type") != Some("application/json") {
                problems.push("content-type should be application/json".to_owned());
            }
            if upstream_hits != 0 {
                problems.push("a refused request must not reach the upstream".to_owned());
            }
        }
    }
    if expect == TokenRequired && reply.header("www-authenticate") != Some("Bearer") {
        problems.push(format!(
            "www-authenticate should be Bearer, is {:?}",
            reply.header("www-authenticate")
        ));
    }
    problems
}

// ---------------------------------------------------------------------------
// The token: where it is read from
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn a_request_without_a_bearer_token_in_authorization_gets_401() {
    let upstream = Upstream::start("api");
    let gateway = auth_gateway(&upstream, &hs256_auth());
    let token = hs256(&with(valid("alice"), "role", json!("admin")));
    let header = |value: String| vec![("authorization", value)];

    let mut cases = Vec::new();
    for path in ["/api/users/1", "/api/admin/1"] {
        cases.extend([
            case("no Authorization header", path, vec![], TokenRequired),
            case(
                "Basic credentials",
                path,
                header("Basic dXNlcjpwYXNz".into()),
                TokenRequired,
            ),
            case(
                "another scheme carrying a valid token",
                path,
                header(format!("Token {token}")),
                TokenRequired,
            ),
            case(
                "a valid token without a scheme",
                path,
                header(token.clone()),
                TokenRequired,
            ),
            case(
                "Bearer and an empty token",
                path,
                header("Bearer ".into()),
                TokenRequired,
            ),
            case("Bearer alone", path, header("Bearer".into()), TokenRequired),
            case(
                "an empty Authorization header",
                path,
                header(String::new()),
                TokenRequired,
            ),
            case(
                "a valid token only in the query string",
                &format!("{path}?access_token={token}"),
                vec![],
                TokenRequired,
            ),
            case(
                "a valid token only in a cookie",
                path,
                vec![("cookie", format!("access_token={token}; token={token}"))],
                TokenRequired,
            ),
            case(
                "the scheme in lower case",
                path,
                header(format!("bearer {token}")),
                Proxied,
            ),
            case(
                "the scheme in upper case",
                path,
                header(format!("BEARER {token}")),
                Proxied,
            ),
            case("the scheme as usual", path, bearer(&token), Proxied),
        ]);
    }
    cases.extend([
        case("a public route needs no token", "/api/public/1", vec![], Proxied),
        case(
            "a public route ignores an invalid token",
            "/api/public/1",
            bearer("not.a.token"),
            Proxied,
        ),
    ]);
    check_cases(&gateway, &upstream, &cases).await;
}

// ---------------------------------------------------------------------------
// The token: what makes it valid
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn a_token_that_fails_verification_gets_403_invalid_token() {
    let upstream = Upstream::start("api");
    let gateway = auth_gateway(&upstream, &hs256_auth());
    let alice = valid("alice");
    let good = hs256(&alice);
    let wrong_secret = EncodingKey::from_secret(OTHER_SECRET.as_bytes());
    let admin = with(valid("alice"), "role", json!("admin"));

    let cases = [
        case("a valid token", "/api/users", bearer(&good), Proxied),
        case(
            "exp an hour ago",
            "/api/users",
            bearer(&hs256(&with(alice.clone(), "exp", json!(now() - 3600)))),
            InvalidToken,
        ),
        case(
            "exp 10 s ago, within leeway_s = 30",
            "/api/users",
            bearer(&hs256(&with(alice.clone(), "exp", json!(now() - 10)))),
            Proxied,
        ),
        case(
            "exp 90 s ago, beyond leeway_s = 30",
            "/api/users",
            bearer(&hs256(&with(alice.clone(), "exp", json!(now() - 90)))),
            InvalidToken,
        ),
        case(
            "nbf an hour ahead",
            "/api/users",
            bearer(&hs256(&with(alice.clone(), "nbf", json!(now() + 3600)))),
            InvalidToken,
        ),
        case(
            "nbf 10 s ahead, within leeway_s = 30",
            "/api/users",
            bearer(&hs256(&with(alice.clone(), "nbf", json!(now() + 10)))),
            Proxied,
        ),
        case(
            "nbf in the past",
            "/api/users",
            bearer(&hs256(&with(alice.clone(), "nbf", json!(now() - 60)))),
            Proxied,
        ),
        case(
            "no exp",
            "/api/users",
            bearer(&hs256(&without(alice.clone(), "exp"))),
            InvalidToken,
        ),
        case(
            "exp as a string",
            "/api/users",
            bearer(&hs256(&with(alice.clone(), "exp", json!((now() + 3600).to_string())))),
            InvalidToken,
        ),
        case(
            "exp null",
            "/api/users",
            bearer(&hs256(&with(alice.clone(), "exp", Value::Null))),
            InvalidToken,
        ),
        case(
            "exp negative",
            "/api/users",
            bearer(&hs256(&with(alice.clone(), "exp", json!(-1)))),
            InvalidToken,
        ),
        case(
            "nbf as a string",
            "/api/users",
            bearer(&hs256(&with(alice.clone(), "nbf", json!((now() - 60).to_string())))),
            InvalidToken,
        ),
        case(
            "signed with another secret",
            "/api/users",
            bearer(&sign(Algorithm::HS256, &wrong_secret, &alice)),
            InvalidToken,
        ),
        case(
            "payload changed (sub), signature kept",
            "/api/users",
            bearer(&tampered(&good, &valid("mallory"))),
            InvalidToken,
        ),
        case(
            "payload changed (role added), signature kept",
            "/api/admin",
            bearer(&tampered(&good, &admin)),
            InvalidToken,
        ),
        case(
            "signature removed",
            "/api/users",
            bearer(&stripped(&good)),
            InvalidToken,
        ),
        case(
            "alg none, empty signature",
            "/api/users",
            bearer(&unsigned(json!({"alg": "none", "typ": "JWT"}), &alice)),
            InvalidToken,
        ),
        case(
            "alg None, empty signature",
            "/api/users",
            bearer(&unsigned(json!({"alg": "None", "typ": "JWT"}), &alice)),
            InvalidToken,
        ),
        case(
            "alg none with an admin role, on the admin route",
            "/api/admin",
            bearer(&unsigned(json!({"alg": "none"}), &admin)),
            InvalidToken,
        ),
        case(
            "alg none without the trailing dot",
            "/api/users",
            bearer(unsigned(json!({"alg": "none"}), &alice).trim_end_matches('.')),
            InvalidToken,
        ),
        case(
            "HS384, which auth.algorithms does not list",
            "/api/users",
            bearer(&sign(
                Algorithm::HS384,
                &EncodingKey::from_secret(SECRET.as_bytes()),
                &alice,
            )),
            InvalidToken,
        ),
        case(
            "an expired token on the admin route is invalid, not unauthorised",
            "/api/admin",
            bearer(&hs256(&with(admin.clone(), "exp", json!(now() - 3600)))),
            InvalidToken,
        ),
        case(
            "garbage: not.a.token",
            "/api/users",
            bearer("not.a.token"),
            InvalidToken,
        ),
        case("garbage: abc", "/api/users", bearer("abc"), InvalidToken),
        case("garbage: ..", "/api/users", bearer(".."), InvalidToken),
        case(
            "iss and aud are ignored when not configured",
            "/api/users",
            bearer(&hs256(&with(
                with(alice.clone(), "iss", json!("anyone")),
                "aud",
                json!("anything"),
            ))),
            Proxied,
        ),
    ];
    check_cases(&gateway, &upstream, &cases).await;
}

#[actix_web::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let upstream = Upstream::start("api");
    let gateway = auth_gateway(
        &upstream,
        &format!("{}\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"", hs256_auth()),
    );
    let right = with(with(valid("alice"), "iss", json!(ISSUER)), "aud", json!(AUDIENCE));
    let token = |claims: Value| bearer(&hs256(&claims));

    let cases = [
        case("the right iss and aud", "/api/users", token(right.clone()), Proxied),
        case(
            "wrong iss",
            "/api/users",
            token(with(right.clone(), "iss", json!("https://evil.test"))),
            InvalidToken,
        ),
        case(
            "wrong aud",
            "/api/users",
            token(with(right.clone(), "aud", json!("another-api"))),
            InvalidToken,
        ),
        case(
            "no iss",
            "/api/users",
            token(without(right.clone(), "iss")),
            InvalidToken,
        ),
        case(
            "no aud",
            "/api/users",
            token(without(right.clone(), "aud")),
            InvalidToken,
        ),
        case(
            "aud as an array holding ours (RFC 7519 4.1.3)",
            "/api/users",
            token(with(right.clone(), "aud", json!(["another-api", AUDIENCE]))),
            Proxied,
        ),
        case(
            "aud as an array without ours",
            "/api/users",
            token(with(right.clone(), "aud", json!(["another-api"]))),
            InvalidToken,
        ),
        case(
            "iss differing only in case",
            "/api/users",
            token(with(right.clone(), "iss", json!(ISSUER.to_uppercase()))),
            InvalidToken,
        ),
    ];
    check_cases(&gateway, &upstream, &cases).await;
}

// ---------------------------------------------------------------------------
// Roles
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn a_route_with_roles_needs_any_one_of_them_in_the_role_claim() {
    let upstream = Upstream::start("api");
    let gateway = auth_gateway(&upstream, &hs256_auth());
    let role = |value: Value| bearer(&hs256(&with(valid("alice"), "role", value)));

    let cases = [
        case(
            "role \"admin\" as a string",
            "/api/admin",
            role(json!("admin")),
            Proxied,
        ),
        case(
            "roles [\"user\", \"admin\"]",
            "/api/admin",
            role(json!(["user", "admin"])),
            Proxied,
        ),
        case(
            "no role claim",
            "/api/admin",
            bearer(&hs256(&valid("alice"))),
            InsufficientPermissions,
        ),
        case(
            "role \"user\" only",
            "/api/admin",
            role(json!("user")),
            InsufficientPermissions,
        ),
        case(
            "roles [\"user\"]",
            "/api/admin",
            role(json!(["user"])),
            InsufficientPermissions,
        ),
        case(
            "an empty role array",
            "/api/admin",
            role(json!([])),
            InsufficientPermissions,
        ),
        case(
            "\"user,admin\" is one role with a comma",
            "/api/admin",
            role(json!("user,admin")),
            InsufficientPermissions,
        ),
        case(
            "role names are case-sensitive",
            "/api/admin",
            role(json!("Admin")),
            InsufficientPermissions,
        ),
        case(
            "admin under another claim than roles_claim",
            "/api/admin",
            bearer(&hs256(&with(valid("alice"), "roles", json!(["admin"])))),
            InsufficientPermissions,
        ),
        case(
            "a route with auth only needs no role",
            "/api/users",
            bearer(&hs256(&valid("alice"))),
            Proxied,
        ),
    ];
    check_cases(&gateway, &upstream, &cases).await;
}

#[actix_web::test]
async fn roles_claim_names_the_claim_that_holds_the_roles() {
    let upstream = Upstream::start("api");
    let gateway = auth_gateway(&upstream, &format!("{}\nroles_claim = \"groups\"", hs256_auth()));
    let cases = [
        case(
            "admin in groups",
            "/api/admin",
            bearer(&hs256(&with(valid("alice"), "groups", json!(["admin"])))),
            Proxied,
        ),
        case(
            "admin in role, which is no longer the roles claim",
            "/api/admin",
            bearer(&hs256(&with(valid("alice"), "role", json!("admin")))),
            InsufficientPermissions,
        ),
    ];
    check_cases(&gateway, &upstream, &cases).await;
}

#[actix_web::test]
async fn a_dotted_roles_claim_reaches_into_nested_claims_after_a_claim_of_that_whole_name() {
    let upstream = Upstream::start("api");
    let keycloak = auth_gateway(
        &upstream,
        &format!("{}\nroles_claim = \"realm_access.roles\"", hs256_auth()),
    );
    let cases = [
        case(
            "admin in realm_access.roles, as Keycloak nests them",
            "/api/admin",
            bearer(&hs256(&with(
                valid("alice"),
                "realm_access",
                json!({ "roles": ["admin"] }),
            ))),
            Proxied,
        ),
        case(
            "realm_access without roles",
            "/api/admin",
            bearer(&hs256(&with(
                valid("alice"),
                "realm_access",
                json!({ "groups": ["admin"] }),
            ))),
            InsufficientPermissions,
        ),
    ];
    check_cases(&keycloak, &upstream, &cases).await;
    let auth0 = auth_gateway(
        &upstream,
        &format!("{}\nroles_claim = \"https://app.example.com/roles\"", hs256_auth()),
    );
    let cases = [case(
        "a namespaced claim whose name has dots, found whole",
        "/api/admin",
        bearer(&hs256(&with(
            valid("alice"),
            "https://app.example.com/roles",
            json!(["admin"]),
        ))),
        Proxied,
    )];
    check_cases(&auth0, &upstream, &cases).await;
}

// ---------------------------------------------------------------------------
/// The gateway remembers tokens it has verified, but a remembered token is
/// refused from the second after its `exp` (plus `leeway_s`) exactly as a
/// new one would be.
#[actix_web::test]
async fn a_token_accepted_before_is_refused_once_it_expires() {
    let upstream = Upstream::start("api");
    let gateway = auth_gateway(&upstream, &format!("jwt_secret = \"{SECRET}\"\nleeway_s = 1"));
    let exp = now() + 1;
    let token = hs256(&with(valid("alice"), "exp", json!(exp)));

    // Each request is a new connection, and connections go to the workers in
    // turn: every worker verifies the token and remembers it.
    for _ in 0..6 {
        let reply = send(&gateway, "/api/users", &bearer(&token)).await;
        assert_eq!(reply.status, 200, "before exp: {}", reply.text());
    }
    // Accepted through exp + leeway_s; refused once the clock passes it.
    while now() <= exp + 1 {
        actix_web::rt::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for _ in 0..6 {
        let reply = send(&gateway, "/api/users", &bearer(&token)).await;
        assert_eq!((reply.status, reply.text()), (403, INVALID_TOKEN.to_owned()));
    }
    assert_eq!(upstream.hits(), 6, "no request after exp reached the upstream");
}

// ---------------------------------------------------------------------------
// What the upstream learns
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn the_upstream_sees_the_callers_identity_and_the_authorization_header_unchanged() {
    let upstream = Upstream::start("api");
    let gateway = auth_gateway(&upstream, &hs256_auth());
    let token = hs256(&with(valid("alice"), "role", json!(["user", "admin"])));

    let reply = send(&gateway, "/api/admin/reports?x=1", &bearer(&token)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = upstream.last_seen();
    assert_eq!(seen.target, "/api/admin/reports?x=1");
    assert_eq!(seen.headers.get("x-user-id"), Some(&vec!["alice".to_owned()]));
    assert_eq!(seen.headers.get("x-user-roles"), Some(&vec!["user,admin".to_owned()]));
    assert_eq!(
        seen.headers.get("authorization"),
        Some(&vec![format!("Bearer {token}")])
    );

    let token = hs256(&with(valid("bob"), "role", json!("admin")));
    assert_eq!(send(&gateway, "/api/admin", &bearer(&token)).await.status, 200);
    let seen = upstream.last_seen();
    assert_eq!(seen.header("x-user-id"), Some("bob"));
    assert_eq!(seen.header("x-user-roles"), Some("admin"));
}

#[actix_web::test]
async fn client_sent_identity_headers_are_replaced_on_auth_routes_and_removed_on_public_ones() {
    let upstream = Upstream::start("api");
    let gateway = auth_gateway(&upstream, &hs256_auth());
    let spoof = |token: Option<&str>| {
        let mut headers = vec![("x-user-id", "spoof".to_owned()), ("x-user-roles", "admin".to_owned())];
        if let Some(token) = token {
            headers.push(("authorization", format!("Bearer {token}")));
        }
        headers
    };

    let user = hs256(&with(valid("alice"), "role", json!("user")));
    let reply = send(&gateway, "/api/users/1", &spoof(Some(&user))).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = upstream.last_seen();
    assert_eq!(seen.headers.get("x-user-id"), Some(&vec!["alice".to_owned()]));
    assert_eq!(seen.headers.get("x-user-roles"), Some(&vec!["user".to_owned()]));

    let no_roles = hs256(&valid("carol"));
    let reply = send(&gateway, "/api/users/1", &spoof(Some(&no_roles))).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = upstream.last_seen();
    assert_eq!(seen.headers.get("x-user-id"), Some(&vec!["carol".to_owned()]));
    let roles = seen.headers.get("x-user-roles");
    assert!(
        roles.is_none() || roles == Some(&vec![String::new()]),
        "a token without roles must not pass the client's roles on: {roles:?}"
    );

    let reply = send(&gateway, "/api/public/1", &spoof(None)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = upstream.last_seen();
    assert_eq!(seen.header("x-user-id"), None);
    assert_eq!(seen.header("x-user-roles"), None);

    let reply = send(&gateway, "/api/public/1", &spoof(Some("not.a.token"))).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = upstream.last_seen();
    assert_eq!(seen.header("x-user-id"), None);
    assert_eq!(seen.header("x-user-roles"), None);

    let hits = upstream.hits();
    let reply = send(&gateway, "/api/users/1", &spoof(None)).await;
    assert_eq!(reply.status, 401, "spoofed identity headers are no token");
    assert_eq!(upstream.hits(), hits);
}

#[actix_web::test]
async fn an_authenticated_request_never_reaches_the_upstream_without_its_identity() {
    // A `sub` or role that cannot be written as a header value must not
    // turn into a proxied request that carries no identity at all: the
    // gateway either forwards the identity or refuses the token.
    let upstream = Upstream::start("api");
    let gateway = auth_gateway(&upstream, &hs256_auth());
    let mut failures = Vec::new();
    for (what, path, claims) in [
        (
            "a sub with a line break",
            "/api/users",
            valid("alice\r\nx-user-roles: admin"),
        ),
        (
            "a role with a line break",
            "/api/admin",
            with(valid("alice"), "role", json!(["admin", "ops\nroot"])),
        ),
    ] {
        let hits = upstream.hits();
        let reply = send(&gateway, path, &bearer(&hs256(&claims))).await;
        if upstream.hits() == hits {
            if reply.status != 403 || reply.text() != INVALID_TOKEN {
                failures.push(format!("{what}: refused with {} {}", reply.status, reply.text()));
            }
            continue;
        }
        let seen = upstream.last_seen();
        if seen.header("x-user-id").is_none() || seen.header("x-user-roles").is_none() {
            failures.push(format!(
                "{what}: proxied ({}) with x-user-id {:?} and x-user-roles {:?}",
                reply.status,
                seen.header("x-user-id"),
                seen.header("x-user-roles")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------
// Public-key algorithms
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn an_rs256_gateway_accepts_only_tokens_signed_with_the_rsa_key() {
    let upstream = Upstream::start("api");
    let gateway = auth_gateway(&upstream, &public_key_auth(r#"["RS256"]"#, "rsa-test-public.pem"));
    let alice = with(valid("alice"), "role", json!("admin"));
    let good = sign(Algorithm::RS256, &rsa_private(), &alice);
    let public_pem_as_secret = EncodingKey::from_secret(&fixture_bytes("rsa-test-public.pem"));

    let cases = [
        case("a valid RS256 token", "/api/admin", bearer(&good), Proxied),
        case(
            "HS256 signed with the public key PEM as the secret (key confusion)",
            "/api/admin",
            bearer(&sign(Algorithm::HS256, &public_pem_as_secret, &alice)),
            InvalidToken,
        ),
        case(
            "HS256 signed with a secret",
            "/api/admin",
            bearer(&hs256(&alice)),
            InvalidToken,
        ),
        case(
            "RS256 with its payload changed",
            "/api/admin",
            bearer(&tampered(&good, &with(alice.clone(), "sub", json!("mallory")))),
            InvalidToken,
        ),
        case(
            "RS256, expired",
            "/api/admin",
            bearer(&sign(
                Algorithm::RS256,
                &rsa_private(),
                &with(alice.clone(), "exp", json!(now() - 3600)),
            )),
            InvalidToken,
        ),
        case(
            "RS384 with the right key, but not listed",
            "/api/admin",
            bearer(&sign(Algorithm::RS384, &rsa_private(), &alice)),
            InvalidToken,
        ),
        case(
            "PS256 with the right key, but not listed",
            "/api/admin",
            bearer(&sign(Algorithm::PS256, &rsa_private(), &alice)),
            InvalidToken,
        ),
        case(
            "ES256",
            "/api/admin",
            bearer(&sign(Algorithm::ES256, &ec_private("ec-p256-test-private.pem"), &alice)),
            InvalidToken,
        ),
        case(
            "alg none",
            "/api/admin",
            bearer(&unsigned(json!({"alg": "none"}), &alice)),
            InvalidToken,
        ),
        case(
            "RS256 signature removed",
            "/api/admin",
            bearer(&stripped(&good)),
            InvalidToken,
        ),
    ];
    check_cases(&gateway, &upstream, &cases).await;
    assert_eq!(send(&gateway, "/api/admin", &bearer(&good)).await.status, 200);
    assert_eq!(upstream.last_seen().header("x-user-id"), Some("alice"));
}

#[actix_web::test]
async fn with_hs256_and_rs256_together_an_hs_token_is_never_checked_against_the_public_key() {
    let upstream = Upstream::start("api");
    let gateway = auth_gateway(
        &upstream,
        &format!(
            "jwt_secret = \"{SECRET}\"\n{}",
            public_key_auth(r#"["HS256", "RS256"]"#, "rsa-test-public.pem")
        ),
    );
    let alice = valid("alice");
    let public_pem_as_secret = EncodingKey::from_secret(&fixture_bytes("rsa-test-public.pem"));
    let cases = [
        case("HS256 with the secret", "/api/users", bearer(&hs256(&alice)), Proxied),
        case(
            "RS256 with the RSA key",
            "/api/users",
            bearer(&sign(Algorithm::RS256, &rsa_private(), &alice)),
            Proxied,
        ),
        case(
            "HS256 signed with the public key PEM as the secret (key confusion)",
            "/api/users",
            bearer(&sign(Algorithm::HS256, &public_pem_as_secret, &alice)),
            InvalidToken,
        ),
    ];
    check_cases(&gateway, &upstream, &cases).await;
}

#[actix_web::test]
async fn an_es256_gateway_accepts_es256_tokens_signed_with_the_p256_key() {
    let upstream = Upstream::start("api");
    let gateway = auth_gateway(&upstream, &public_key_auth(r#"["ES256"]"#, "ec-p256-test-public.pem"));
    let alice = with(valid("alice"), "role", json!("admin"));
    let good = sign(Algorithm::ES256, &ec_private("ec-p256-test-private.pem"), &alice);
    let public_pem_as_secret = EncodingKey::from_secret(&fixture_bytes("ec-p256-test-public.pem"));
    let cases = [
        case("a valid ES256 token", "/api/admin", bearer(&good), Proxied),
        case(
            "ES256 with its payload changed",
            "/api/admin",
            bearer(&tampered(&good, &with(alice.clone(), "sub", json!("mallory")))),
            InvalidToken,
        ),
        case(
            "ES384 with a P-384 key",
            "/api/admin",
            bearer(&sign(Algorithm::ES384, &ec_private("ec-p384-test-private.pem"), &alice)),
            InvalidToken,
        ),
        case(
            "HS256 signed with the public key PEM as the secret (key confusion)",
            "/api/admin",
            bearer(&sign(Algorithm::HS256, &public_pem_as_secret, &alice)),
            InvalidToken,
        ),
        case(
            "RS256",
            "/api/admin",
            bearer(&sign(Algorithm::RS256, &rsa_private(), &alice)),
            InvalidToken,
        ),
    ];
    check_cases(&gateway, &upstream, &cases).await;
}

#[actix_web::test]
async fn an_es384_gateway_accepts_es384_tokens_signed_with_the_p384_key() {
    let upstream = Upstream::start("api");
    let gateway = auth_gateway(&upstream, &public_key_auth(r#"["ES384"]"#, "ec-p384-test-public.pem"));
    let alice = valid("alice");
    let cases = [
        case(
            "a valid ES384 token",
            "/api/users",
            bearer(&sign(Algorithm::ES384, &ec_private("ec-p384-test-private.pem"), &alice)),
            Proxied,
        ),
        case(
            "ES256 with a P-256 key",
            "/api/users",
            bearer(&sign(Algorithm::ES256, &ec_private("ec-p256-test-private.pem"), &alice)),
            InvalidToken,
        ),
    ];
    check_cases(&gateway, &upstream, &cases).await;
}

// ---------------------------------------------------------------------------
// Start-up refusals
// ---------------------------------------------------------------------------

/// A loopback listener on port 0, one service and one route that needs auth,
/// with the `[auth]` lines given.
fn one_auth_route(auth: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
workers = 1

[auth]
{auth}

[services.api]
instances = ["http://127.0.0.1:9"]

[routes.users]
prefix = "/api/users"
service = "api"
auth = true
"#
    )
}

fn load(toml: &str) -> Result<Settings, ConfigError> {
    let dir = settings_dir(toml);
    Settings::load(&Sources {
        settings_dir: dir.path().to_owned(),
        environment: "test".to_owned(),
        config_file: None,
        vars: Default::default(),
    })
}

/// 31 bytes: one short of the minimum.
const SECRET_31: &str = "0123456789abcdefghijklmnopqrstu";
/// 32 bytes: exactly the minimum.
const SECRET_32: &str = "0123456789abcdefghijklmnopqrstuv";

#[test]
fn settings_load_refuses_an_auth_route_without_a_32_byte_hs_secret() {
    assert_eq!(SECRET_31.len(), 31);
    assert_eq!(SECRET_32.len(), 32);
    for (what, auth) in [
        ("no secret", String::new()),
        ("an empty secret", "jwt_secret = \"\"".to_owned()),
        ("a 31-byte secret", format!("jwt_secret = \"{SECRET_31}\"")),
    ] {
        let found = problems(&one_auth_route(&auth));
        assert!(
            found.iter().any(|line| line.starts_with("auth.jwt_secret: ")),
            "{what}: {found:?}"
        );
        assert!(
            !found.iter().any(|line| line.contains(SECRET_31)),
            "{what}: the secret must not be echoed: {found:?}"
        );
    }
    load(&one_auth_route(&format!("jwt_secret = \"{SECRET_32}\""))).expect("a 32-byte secret is enough");
    load(&one_auth_route("algorithms = [\"HS384\"]\njwt_secret = \"\""))
        .expect_err("every HS algorithm needs the secret");
}

#[test]
fn settings_load_needs_no_secret_when_no_route_needs_auth() {
    let toml = one_auth_route("").replace("auth = true", "auth = false");
    load(&toml).expect("no route needs auth, so no key is needed");
}

#[test]
fn settings_load_refuses_public_key_algorithms_without_a_readable_key_file() {
    for (what, auth) in [
        ("no path", "algorithms = [\"RS256\"]".to_owned()),
        (
            "an empty path",
            "algorithms = [\"RS256\"]\npublic_key_pem = \"\"".to_owned(),
        ),
        (
            "a path that does not exist",
            "algorithms = [\"RS256\"]\npublic_key_pem = \"/nonexistent/gatehouse-test.pem\"".to_owned(),
        ),
        ("ES256 and no path", "algorithms = [\"ES256\"]".to_owned()),
    ] {
        let found = problems(&one_auth_route(&auth));
        assert!(
            found.iter().any(|line| line.starts_with("auth.public_key_pem: ")),
            "{what}: {found:?}"
        );
    }
    load(&one_auth_route(&public_key_auth(r#"["RS256"]"#, "rsa-test-public.pem")))
        .expect("a readable RSA public key is enough");
}

/// Runs `gatehouse ARGS` on the settings directory `dir` in the `test`
/// environment with warnings-only logs, `env` and no stray configuration from
/// this process's environment.
fn gatehouse_in_test(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Finished {
    let mut vars = vec![("GATEHOUSE_LOG", "warn")];
    vars.extend_from_slice(env);
    run_gatehouse(dir, Some("test"), &vars, args)
}

/// `gatehouse ARGS` must exit 1 with a message naming `key`.
fn assert_refused(toml: &str, args: &[&str], key: &str, what: &str) -> Finished {
    let dir = settings_dir(toml);
    let run = gatehouse_in_test(dir.path(), args, &[]);
    assert_eq!(
        run.code,
        Some(1),
        "{what}: `gatehouse {}` should exit 1\nstdout: {}\nstderr: {}",
        args.join(" "),
        run.stdout,
        run.stderr
    );
    assert!(
        run.stderr.contains(key),
        "{what}: `gatehouse {}` should name {key}; stderr: {}",
        args.join(" "),
        run.stderr
    );
    run
}

#[test]
fn the_binary_exits_1_naming_the_key_when_auth_routes_have_no_usable_key() {
    let cases = [
        ("no HS secret", String::new(), "auth.jwt_secret"),
        (
            "a 31-byte HS secret",
            format!("jwt_secret = \"{SECRET_31}\""),
            "auth.jwt_secret",
        ),
        (
            "RS256 without a key path",
            "algorithms = [\"RS256\"]".to_owned(),
            "auth.public_key_pem",
        ),
        (
            "RS256 with a key path that does not exist",
            "algorithms = [\"RS256\"]\npublic_key_pem = \"/nonexistent/gatehouse-test.pem\"".to_owned(),
            "auth.public_key_pem",
        ),
    ];
    for (what, auth, key) in cases {
        let toml = one_auth_route(&auth);
        for args in [&["check-config"][..], &[][..], &["serve"][..]] {
            let run = assert_refused(&toml, args, key, what);
            assert!(
                !run.stderr.contains(SECRET_31) && !run.stdout.contains(SECRET_31),
                "{what}: the secret must never be printed"
            );
            if args == ["check-config"] {
                assert_eq!(run.stdout, "", "{what}: an invalid config is not printed");
            }
        }
    }
}

#[test]
fn the_binary_accepts_the_same_config_with_a_usable_key() {
    let dir = settings_dir(&one_auth_route(&format!("jwt_secret = \"{SECRET}\"")));
    let run = gatehouse_in_test(dir.path(), &["check-config"], &[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(!run.stdout.contains(SECRET), "check-config must redact the secret");
    let dir = settings_dir(&one_auth_route(&public_key_auth(r#"["RS256"]"#, "rsa-test-public.pem")));
    let run = gatehouse_in_test(dir.path(), &["check-config"], &[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
}

/// Key files that exist and can be read but hold no usable public key.
fn unusable_key_files(dir: &Path) -> Vec<(&'static str, String, &'static str)> {
    let not_pem = dir.join("not-a-key.pem");
    std::fs::write(&not_pem, "this is not a PEM key\n").unwrap();
    let corrupt = dir.join("corrupt.pem");
    std::fs::write(
        &corrupt,
        "-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5IGF0IGFsbA==\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    vec![
        ("a text file that is not PEM", not_pem.display().to_string(), "RS256"),
        ("a PEM block holding no key", corrupt.display().to_string(), "RS256"),
        (
            "an EC public key for RS256",
            fixture("ec-p256-test-public.pem"),
            "RS256",
        ),
        ("an RSA public key for ES256", fixture("rsa-test-public.pem"), "ES256"),
    ]
}

#[test]
fn serve_exits_1_naming_public_key_pem_when_the_file_is_not_a_usable_public_key() {
    let keys = tempfile::tempdir().unwrap();
    for (what, path, algorithm) in unusable_key_files(keys.path()) {
        let toml = one_auth_route(&format!("algorithms = [\"{algorithm}\"]\npublic_key_pem = {path:?}"));
        for args in [&[][..], &["serve"][..]] {
            assert_refused(&toml, args, "auth.public_key_pem", what);
        }
    }
}

#[test]
fn check_config_rejects_a_public_key_file_that_is_not_a_usable_public_key() {
    // check-config promises exit 1 for any config the gateway would refuse.
    let keys = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (what, path, algorithm) in unusable_key_files(keys.path()) {
        let toml = one_auth_route(&format!("algorithms = [\"{algorithm}\"]\npublic_key_pem = {path:?}"));
        let dir = settings_dir(&toml);
        let run = gatehouse_in_test(dir.path(), &["check-config"], &[]);
        if run.code != Some(1) || !run.stderr.contains("auth.public_key_pem") {
            failures.push(format!(
                "{what}: check-config exited {:?}, stderr {:?}",
                run.code, run.stderr
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn serve_refuses_the_rsa_private_key_given_as_public_key_pem() {
    // A likely operator mistake; the gateway would otherwise start and then
    // refuse every token.
    let toml = one_auth_route(&format!(
        "algorithms = [\"RS256\"]\npublic_key_pem = {:?}",
        fixture("rsa-test-private.pem")
    ));
    assert_refused(&toml, &[], "auth.public_key_pem", "an RSA private key");
}

// ---------------------------------------------------------------------------
// gatehouse token
// ---------------------------------------------------------------------------

/// The settings for `gatehouse token`, with the `[auth]` lines given.
fn token_settings(auth: &str) -> tempfile::TempDir {
    settings_dir(&one_auth_route(auth))
}

/// Runs `gatehouse token ARGS`; it must print exactly one token and a newline.
fn mint(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut full = vec!["token"];
    full.extend_from_slice(args);
    let run = gatehouse_in_test(dir, &full, env);
    assert_eq!(run.code, Some(0), "gatehouse {full:?} failed: {}", run.stderr);
    let token = run
        .stdout
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("stdout must end with a newline: {:?}", run.stdout));
    let parts: Vec<&str> = token.split('.').collect();
    assert!(
        parts.len() == 3
            && parts.iter().all(|part| !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')),
        "stdout must be only a compact JWT and a newline: {:?}",
        run.stdout
    );
    token.to_owned()
}

/// Verifies `token` with `secret` and returns its header and claims.
fn decode_hs(token: &str, secret: &str, algorithm: Algorithm) -> (Header, Value) {
    let mut validation = Validation::new(algorithm);
    validation.validate_aud = false;
    validation.set_required_spec_claims(&["exp", "sub"]);
    let data = jsonwebtoken::decode::<Value>(token, &DecodingKey::from_secret(secret.as_bytes()), &validation)
        .expect("the minted token verifies with the configured secret");
    (data.header, data.claims)
}

#[test]
fn gatehouse_token_prints_only_a_token_with_sub_roles_and_ttl() {
    let dir = token_settings(&format!("jwt_secret = \"{SECRET}\""));
    let before = now();
    let token = mint(
        dir.path(),
        &["--sub", "alice", "--role", "admin", "--role", "ops", "--ttl", "120"],
        &[],
    );
    let after = now();
    let (header, claims) = decode_hs(&token, SECRET, Algorithm::HS256);
    assert_eq!(header.alg, Algorithm::HS256);
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["role"], json!(["admin", "ops"]));
    let iat = claims["iat"].as_i64().expect("iat is a number");
    let exp = claims["exp"].as_i64().expect("exp is a number");
    assert!((before..=after).contains(&iat), "iat {iat} is now");
    assert_eq!(exp - iat, 120);
    assert!(claims.get("iss").is_none(), "no issuer is configured");
    assert!(claims.get("aud").is_none(), "no audience is configured");

    let token = mint(dir.path(), &["--sub", "bob", "--role", "admin"], &[]);
    let (_, claims) = decode_hs(&token, SECRET, Algorithm::HS256);
    assert_eq!(claims["role"], json!("admin"), "one role is a string");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        3600,
        "the default ttl is an hour"
    );

    let token = mint(dir.path(), &["--sub", "carol"], &[]);
    let (_, claims) = decode_hs(&token, SECRET, Algorithm::HS256);
    assert_eq!(claims["sub"], "carol");
    assert!(claims.get("role").is_none(), "no role, no claim: {claims}");
}

#[test]
fn gatehouse_token_adds_iss_aud_and_uses_the_configured_roles_claim_and_algorithm() {
    let dir = token_settings(&format!(
        "jwt_secret = \"{SECRET}\"\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\nroles_claim = \"groups\"\nalgorithms = [\"HS384\", \"HS256\"]"
    ));
    let token = mint(dir.path(), &["--sub", "alice", "--role", "admin"], &[]);
    let (header, claims) = decode_hs(&token, SECRET, Algorithm::HS384);
    assert_eq!(header.alg, Algorithm::HS384, "the first HS algorithm");
    assert_eq!(claims["iss"], ISSUER);
    assert_eq!(claims["aud"], AUDIENCE);
    assert_eq!(claims["groups"], json!("admin"));
    assert!(claims.get("role").is_none());
}

#[test]
fn gatehouse_token_signs_with_the_jwt_secret_variable() {
    let dir = settings_dir(&one_auth_route("").replace("auth = true", "auth = false"));
    let token = mint(dir.path(), &["--sub", "alice"], &[("JWT_SECRET", SECRET)]);
    let (_, claims) = decode_hs(&token, SECRET, Algorithm::HS256);
    assert_eq!(claims["sub"], "alice");

    let run = gatehouse_in_test(dir.path(), &["token", "--sub", "alice"], &[]);
    assert_eq!(run.code, Some(1), "no secret, no token: {}", run.stdout);
    assert!(run.stderr.contains("auth.jwt_secret"), "{}", run.stderr);
    assert_eq!(run.stdout, "");
}

#[actix_web::test]
async fn a_token_from_gatehouse_token_is_accepted_by_the_gateway() {
    let upstream = Upstream::start("api");
    let gateway = auth_gateway(
        &upstream,
        &format!("{}\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"", hs256_auth()),
    );
    let dir = token_settings(&format!(
        "jwt_secret = \"{SECRET}\"\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\""
    ));
    let admin = mint(dir.path(), &["--sub", "alice", "--role", "admin", "--role", "ops"], &[]);
    let user = mint(dir.path(), &["--sub", "bob", "--role", "user"], &[]);

    let reply = send(&gateway, "/api/admin/1", &bearer(&admin)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = upstream.last_seen();
    assert_eq!(seen.header("x-user-id"), Some("alice"));
    assert_eq!(seen.header("x-user-roles"), Some("admin,ops"));

    let reply = send(&gateway, "/api/admin/1", &bearer(&user)).await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.text(), INSUFFICIENT_PERMISSIONS);
    let reply = send(&gateway, "/api/users/1", &bearer(&user)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(upstream.last_seen().header("x-user-id"), Some("bob"));
}
