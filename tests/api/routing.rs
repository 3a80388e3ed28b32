//! Routing by path prefix (SPEC §3 step 3), as a client sees it.

use crate::helpers::*;

fn two_services(users: &Upstream, other: &Upstream) -> String {
    format!(
        r#"
[services.user]
instances = {users}
[services.other]
instances = {other}

[routes.users]
prefix = "/api/users"
service = "user"

[routes.user-admin]
prefix = "/api/users/admin"
service = "other"
methods = ["POST"]

[routes.stripped]
prefix = "/strip"
service = "other"
strip_prefix = true
"#,
        users = instances(&[users]),
        other = instances(&[other]),
    )
}

#[actix_web::test]
async fn the_longest_matching_prefix_wins_on_segment_boundaries() {
    let users = Upstream::start("users");
    let other = Upstream::start("other");
    let gateway = TestGateway::start(&two_services(&users, &other));

    let reply = get(&gateway.url("/api/users/7?x=1")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-upstream-instance"), Some("users"));
    assert_eq!(users.last_seen().target, "/api/users/7?x=1");

    let reply = client().post(gateway.url("/api/users/admin/1")).send().await.unwrap();
    assert_eq!(read_reply(reply).await.header("x-upstream-instance"), Some("other"));

    let reply = get(&gateway.url("/api/users/admin/1")).await;
    assert_eq!(
        reply.header("x-upstream-instance"),
        Some("users"),
        "GET is not allowed on the longer route"
    );

    let reply = get(&gateway.url("/api/usersx")).await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.text(), r#"{"error":"Not found"}"#);
    assert_eq!(reply.header("content-type"), Some("application/json"));

    let reply = get(&gateway.url("/API/users")).await;
    assert_eq!(reply.status, 404, "matching is case-sensitive");
}

#[actix_web::test]
async fn strip_prefix_forwards_the_rest_of_the_path() {
    let users = Upstream::start("users");
    let other = Upstream::start("other");
    let gateway = TestGateway::start(&two_services(&users, &other));

    assert_eq!(get(&gateway.url("/strip/a/b?q=1")).await.status, 200);
    assert_eq!(other.last_seen().target, "/a/b?q=1");
    assert_eq!(get(&gateway.url("/strip")).await.status, 200);
    assert_eq!(other.last_seen().target, "/");
}

#[actix_web::test]
async fn a_method_no_route_allows_gets_405_with_allow() {
    let users = Upstream::start("users");
    let other = Upstream::start("other");
    let gateway = TestGateway::start(&format!(
        r#"
[services.user]
instances = {}
[routes.reports]
prefix = "/reports"
service = "user"
methods = ["GET", "HEAD"]
"#,
        instances(&[&users])
    ));
    let reply = read_reply(client().delete(gateway.url("/reports/1")).send().await.unwrap()).await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.text(), r#"{"error":"Method not allowed"}"#);
    assert_eq!(reply.header("allow"), Some("GET, HEAD"));
    assert_eq!(users.hits(), 0);
    drop(other);
}

// ---------------------------------------------------------------------------
// Host routing (`hosts`, SPEC §3 step 3)
// ---------------------------------------------------------------------------

fn host_routes(exact: &Upstream, wild: &Upstream, any: &Upstream) -> String {
    format!(
        r#"
[services.exact]
instances = {exact}
[services.wild]
instances = {wild}
[services.any]
instances = {any}

[routes.exact]
prefix = "/"
service = "exact"
hosts = ["api.example.com", "Admin.Example.com"]

[routes.wild]
prefix = "/api"
service = "wild"
hosts = ["*.example.com"]

[routes.any]
prefix = "/api/users"
service = "any"

[routes.exact-writes]
prefix = "/api/users"
service = "exact"
hosts = ["writes.example.com"]
methods = ["POST"]
"#,
        exact = instances(&[exact]),
        wild = instances(&[wild]),
        any = instances(&[any]),
    )
}

async fn instance_for(gateway: &TestGateway, method: &str, host: &str, path: &str) -> String {
    let method = awc::http::Method::from_bytes(method.as_bytes()).unwrap();
    let response = client()
        .request(method, gateway.url(path))
        .insert_header(("host", host))
        .send()
        .await
        .expect("request reaches the gateway");
    let reply = read_reply(response).await;
    match reply.status {
        200 => reply.header("x-upstream-instance").unwrap_or("?").to_owned(),
        status => status.to_string(),
    }
}

#[actix_web::test]
async fn a_route_naming_the_host_beats_a_wildcard_which_beats_a_route_without_hosts() {
    let (exact, wild, any) = (
        Upstream::start("exact"),
        Upstream::start("wild"),
        Upstream::start("any"),
    );
    let gateway = TestGateway::start(&host_routes(&exact, &wild, &any));

    for (host, path, expected) in [
        // The exact host wins over a longer prefix elsewhere.
        ("api.example.com", "/api/users/1", "exact"),
        ("API.Example.COM:8080", "/api/users/1", "exact"),
        ("admin.example.com", "/anything", "exact"),
        ("api.example.com.", "/api/users/1", "exact"),
        // A wildcard matches one label, and beats a route without hosts.
        ("www.example.com", "/api/users/1", "wild"),
        ("WWW.example.com:443", "/api/x", "wild"),
        ("a.b.example.com", "/api/users/1", "any"),
        ("example.com", "/api/users/1", "any"),
        // No route answers for that host on that path.
        ("www.example.com", "/other", "404"),
        ("elsewhere.test", "/api/x", "404"),
        ("127.0.0.1", "/api/users", "any"),
    ] {
        assert_eq!(
            instance_for(&gateway, "GET", host, path).await,
            expected,
            "GET {path} with Host {host}"
        );
    }
    // A route that names the host takes part only for its methods.
    assert_eq!(
        instance_for(&gateway, "POST", "writes.example.com", "/api/users/1").await,
        "exact"
    );
    assert_eq!(
        instance_for(&gateway, "GET", "writes.example.com", "/api/users/1").await,
        "wild"
    );
    assert_eq!(exact.last_seen().target, "/api/users/1");
}

#[actix_web::test]
async fn an_absolute_form_target_is_routed_by_its_authority_and_http10_without_host_by_routes_without_hosts() {
    let (exact, wild, any) = (
        Upstream::start("exact"),
        Upstream::start("wild"),
        Upstream::start("any"),
    );
    let gateway = TestGateway::start(&host_routes(&exact, &wild, &any));

    let reply = raw_request(
        &gateway,
        &[
            "GET http://api.example.com/api/users/1 HTTP/1.1",
            "Host: elsewhere.test",
            "Connection: close",
        ],
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-upstream-instance"), Some("exact"));

    let reply = raw_request(&gateway, &["GET /api/users/1 HTTP/1.0"]);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-upstream-instance"), Some("any"));
    let reply = raw_request(&gateway, &["GET /other HTTP/1.0"]);
    assert_eq!(reply.status, 404, "{reply:?}");
}

#[actix_web::test]
async fn hosts_that_are_not_names_and_same_prefix_routes_on_overlapping_hosts_are_refused() {
    let base = "[services.api]\ninstances = [\"http://127.0.0.1:9\"]\n";
    let found = problems(&format!(
        "{base}[routes.a]\nprefix = \"/a\"\nservice = \"api\"\nhosts = [\"example.com:80\", \"*\", \"a.*.com\"]\n"
    ));
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(found.iter().all(|p| p.starts_with("routes.a.hosts: ")), "{found:?}");

    let found = problems(&format!(
        "{base}[routes.a]\nprefix = \"/a\"\nservice = \"api\"\nhosts = [\"x.example\"]\n\
         [routes.b]\nprefix = \"/a\"\nservice = \"api\"\nhosts = [\"X.example\", \"y.example\"]\n"
    ));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("is also the prefix of routes.a"), "{found:?}");

    // The same prefix on different hosts is fine.
    let dir = settings_dir(&format!(
        "{base}[routes.a]\nprefix = \"/a\"\nservice = \"api\"\nhosts = [\"x.example\"]\n\
         [routes.b]\nprefix = \"/a\"\nservice = \"api\"\nhosts = [\"*.x.example\"]\n"
    ));
    load_settings(dir.path());
}
