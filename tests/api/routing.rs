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
