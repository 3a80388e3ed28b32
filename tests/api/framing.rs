//! Framing and path checks (SPEC §3 step 2) and the server's own limits
//! (`max_header_bytes`, `max_body_bytes`, `client_request_timeout_ms`), as a
//! client on a raw socket sees them and as the upstream sees them; and that
//! malformed requests reach the log at debug only.
//!
//! Raw sockets, not awc: a client library would fix or refuse the very
//! requests these tests are about.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::helpers::*;

/// How long one raw exchange waits for the gateway to close the connection.
const READ_LIMIT: Duration = Duration::from_secs(8);
/// A connection the gateway must close is closed well before [`READ_LIMIT`].
const CLOSED_WITHIN: Duration = Duration::from_secs(3);

const BAD_REQUEST: &str = r#"{"error":"Bad request"}"#;

/// A gateway with one service `api` on `upstream`, one route on `prefix`,
/// and extra `[server]` keys.
fn start_gateway(upstream: &Upstream, prefix: &str, server: &str) -> TestGateway {
    TestGateway::builder().server(server).start(&format!(
        r#"
[services.api]
instances = {instances}

[routes.api]
prefix = "{prefix}"
service = "api"
"#,
        instances = instances(&[upstream]),
    ))
}

/// The first response read off a raw connection, and how long the gateway
/// took to close it.
struct RawReply {
    raw: String,
    status: Option<u16>,
    headers: Vec<(String, String)>,
    body: String,
    elapsed: Duration,
}

impl RawReply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header_name, _)| header_name == name)
            .map(|(_, value)| value.as_str())
    }

    fn status_line(&self) -> &str {
        self.raw.lines().next().unwrap_or("<nothing>")
    }

    fn closed_promptly(&self) -> bool {
        self.elapsed < CLOSED_WITHIN
    }

    /// Statuses of every response on the connection, in order (each body
    /// is skipped by its `Content-Length`).
    fn statuses(&self) -> Vec<u16> {
        let mut statuses = Vec::new();
        let mut rest = self.raw.as_str();
        while !rest.is_empty() {
            let reply = parse_reply(rest.to_owned(), self.elapsed);
            let Some(status) = reply.status else { break };
            statuses.push(status);
            let head_len = rest.find("\r\n\r\n").map_or(rest.len(), |at| at + 4);
            let body_len = reply
                .header("content-length")
                .and_then(|length| length.parse::<usize>().ok())
                .unwrap_or(rest.len());
            rest = rest.get(head_len + body_len..).unwrap_or("");
        }
        statuses
    }
}

fn parse_reply(raw: String, elapsed: Duration) -> RawReply {
    let (head, rest) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.strip_prefix("HTTP/1.1 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok());
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let length = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .and_then(|(_, value)| value.parse::<usize>().ok());
    let body = match length {
        Some(length) => rest.get(..length).unwrap_or(rest),
        None => rest,
    }
    .to_owned();
    RawReply {
        status,
        headers,
        body,
        elapsed,
        raw,
    }
}

/// Writes `request` on a fresh connection and reads until the gateway closes
/// it (or [`READ_LIMIT`] passes).
fn exchange(gateway: &TestGateway, request: &[u8]) -> RawReply {
    let started = Instant::now();
    let raw = raw_exchange(gateway.address, request, READ_LIMIT);
    parse_reply(raw, started.elapsed())
}

/// A well-formed GET for `target` that asks the gateway to close after it.
fn get_request(target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: gatehouse.test\r\nConnection: close\r\n\r\n").into_bytes()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(pattern_byte).collect()
}

/// A request with a `Content-Length` body.
fn post_request(target: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST {target} HTTP/1.1\r\nHost: gatehouse.test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// A request whose body is sent chunked, one chunk per slice.
fn chunked_request(target: &str, chunks: &[&[u8]]) -> Vec<u8> {
    let mut request = format!(
        "POST {target} HTTP/1.1\r\nHost: gatehouse.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in chunks {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    request
}

/// Sends each case on its own connection to a gateway whose route `/`
/// forwards everything, and checks SPEC §3 step 2: 400, the connection closed
/// by the gateway, nothing forwarded. Every failing case is reported.
fn assert_refused_as_ambiguous(cases: &[(&str, String)]) {
    let upstream = Upstream::start("api");
    let gateway = start_gateway(&upstream, "/", "");
    let mut problems = Vec::new();
    for (name, request) in cases {
        let before = upstream.hits();
        let reply = exchange(&gateway, request.as_bytes());
        if reply.status != Some(400) {
            problems.push(format!("{name}: expected 400, got {:?}", reply.status_line()));
        }
        if !reply.closed_promptly() {
            problems.push(format!("{name}: the connection stayed open ({:?})", reply.elapsed));
        }
        if upstream.hits() != before {
            problems.push(format!("{name}: the upstream saw {:?}", upstream.last_seen().target));
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// `POST /api/x` with the given header lines and body, keep-alive.
fn framed(headers: &str, body: &str) -> String {
    format!("POST /api/x HTTP/1.1\r\nHost: gatehouse.test\r\n{headers}\r\n{body}")
}

// --- ambiguous framing --------------------------------------------------

#[test]
fn content_length_with_transfer_encoding_gets_400_and_a_closed_connection() {
    assert_refused_as_ambiguous(&[
        (
            "CL then TE",
            framed("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"),
        ),
        (
            "TE then CL",
            framed("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", "0\r\n\r\n"),
        ),
        (
            "CL 0 with TE",
            framed("Content-Length: 0\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"),
        ),
    ]);
}

#[test]
fn differing_duplicate_or_malformed_content_length_gets_400_and_a_closed_connection() {
    assert_refused_as_ambiguous(&[
        (
            "two differing Content-Length",
            framed("Content-Length: 5\r\nContent-Length: 6\r\n", "hello!"),
        ),
        (
            "two identical Content-Length",
            framed("Content-Length: 5\r\nContent-Length: 5\r\n", "hello"),
        ),
        ("Content-Length +5", framed("Content-Length: +5\r\n", "hello")),
        ("Content-Length abc", framed("Content-Length: abc\r\n", "hello")),
        ("Content-Length -1", framed("Content-Length: -1\r\n", "hello")),
        ("Content-Length list 5, 6", framed("Content-Length: 5, 6\r\n", "hello!")),
    ]);
}

#[test]
fn a_transfer_coding_other_than_a_final_chunked_gets_400_and_a_closed_connection() {
    assert_refused_as_ambiguous(&[
        (
            "gzip, chunked",
            framed("Transfer-Encoding: gzip, chunked\r\n", "0\r\n\r\n"),
        ),
        (
            "chunked, gzip",
            framed("Transfer-Encoding: chunked, gzip\r\n", "0\r\n\r\n"),
        ),
        ("identity", framed("Transfer-Encoding: identity\r\n", "0\r\n\r\n")),
        ("xchunked", framed("Transfer-Encoding: xchunked\r\n", "0\r\n\r\n")),
        (
            "chunked on two lines",
            framed(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                "0\r\n\r\n",
            ),
        ),
    ]);
}

#[test]
fn an_obs_folded_header_gets_400_and_a_closed_connection() {
    assert_refused_as_ambiguous(&[
        (
            "fold with a space",
            "GET /api/x HTTP/1.1\r\nHost: gatehouse.test\r\nX-Folded: a\r\n b\r\n\r\n".to_owned(),
        ),
        (
            "fold with a tab",
            "GET /api/x HTTP/1.1\r\nHost: gatehouse.test\r\nX-Folded: a\r\n\tb\r\n\r\n".to_owned(),
        ),
        ("folded Content-Length", framed("Content-Length:\r\n 5\r\n", "hello")),
    ]);
}

#[test]
fn more_than_one_host_line_gets_400_and_a_closed_connection_even_when_identical() {
    assert_refused_as_ambiguous(&[
        (
            "two different Host lines",
            "GET /api/x HTTP/1.1\r\nHost: gatehouse.test\r\nHost: evil.example\r\n\r\n".to_owned(),
        ),
        (
            "two identical Host lines",
            "GET /api/x HTTP/1.1\r\nHost: gatehouse.test\r\nHost: gatehouse.test\r\n\r\n".to_owned(),
        ),
    ]);
}

#[test]
fn a_request_hidden_in_an_ambiguous_body_never_reaches_the_upstream() {
    let upstream = Upstream::start("api");
    let gateway = start_gateway(&upstream, "/", "");
    let hidden = "GET /api/smuggled HTTP/1.1\r\nHost: gatehouse.test\r\n\r\n";

    // CL.TE: a front end that believes Content-Length forwards it all; a back
    // end that believes chunked sees a second request.
    let body = format!("0\r\n\r\n{hidden}");
    let cl_te = format!(
        "POST /api/x HTTP/1.1\r\nHost: gatehouse.test\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{body}",
        body.len()
    );
    // TE.CL: the other way round.
    let te_cl = format!(
        "POST /api/x HTTP/1.1\r\nHost: gatehouse.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{hidden}\r\n0\r\n\r\n",
        hidden.len()
    );
    // TE.TE: a second, bogus coding one side might ignore.
    let te_te = format!(
        "POST /api/x HTTP/1.1\r\nHost: gatehouse.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: cow\r\n\r\n{:x}\r\n{hidden}\r\n0\r\n\r\n",
        hidden.len()
    );
    for (name, request) in [("CL.TE", cl_te), ("TE.CL", te_cl), ("TE.TE", te_te)] {
        let reply = exchange(&gateway, request.as_bytes());
        assert_eq!(reply.status, Some(400), "{name}: {:?}", reply.raw);
        assert_eq!(
            reply.statuses(),
            vec![400],
            "{name}: one answer, then the connection is closed: {:?}",
            reply.raw
        );
        assert!(reply.closed_promptly(), "{name}: {:?}", reply.elapsed);
    }

    let after = exchange(&gateway, &get_request("/api/after"));
    assert_eq!(after.status, Some(200));
    let targets: Vec<String> = upstream.seen().into_iter().map(|seen| seen.target).collect();
    assert_eq!(
        targets,
        vec!["/api/after".to_owned()],
        "neither the ambiguous requests nor the hidden ones were forwarded"
    );
}

#[test]
fn a_request_inside_a_well_framed_body_is_forwarded_as_body_not_as_a_request() {
    let upstream = Upstream::start("api");
    let gateway = start_gateway(&upstream, "/", "");
    let hidden = b"GET /api/smuggled HTTP/1.1\r\nHost: gatehouse.test\r\n\r\n";

    let reply = exchange(&gateway, &chunked_request("/api/x", &[hidden]));
    assert_eq!(reply.status, Some(200), "{:?}", reply.raw);
    let reply = exchange(&gateway, &post_request("/api/y", hidden));
    assert_eq!(reply.status, Some(200), "{:?}", reply.raw);

    let seen = upstream.seen();
    let targets: Vec<&str> = seen.iter().map(|seen| seen.target.as_str()).collect();
    assert_eq!(targets, ["/api/x", "/api/y"], "one upstream request each");
    for request in &seen {
        assert_eq!(request.body_len, hidden.len());
        assert_eq!(request.body_sha256, sha256_hex(hidden));
    }
}

#[test]
fn pipelined_requests_reach_the_upstream_one_for_one() {
    let upstream = Upstream::start("api");
    let gateway = start_gateway(&upstream, "/", "");
    let mut request = post_request("/api/one", b"hello");
    request.extend_from_slice(b"GET /api/two HTTP/1.1\r\nHost: gatehouse.test\r\n\r\n");
    request.extend_from_slice(&get_request("/api/three"));

    let reply = exchange(&gateway, &request);
    assert_eq!(reply.statuses(), vec![200, 200, 200], "{:?}", reply.raw);
    let targets: Vec<String> = upstream.seen().into_iter().map(|seen| seen.target).collect();
    assert_eq!(targets, ["/api/one", "/api/two", "/api/three"]);
}

// --- absolute-form targets ----------------------------------------------

#[test]
fn an_absolute_form_target_is_routed_by_its_path_alone() {
    let upstream = Upstream::start("api");
    let gateway = start_gateway(&upstream, "/api", "");

    let reply = exchange(
        &gateway,
        b"GET http://evil.example/api/x?q=1 HTTP/1.1\r\nHost: whatever\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(reply.status, Some(200), "{:?}", reply.raw);
    assert_eq!(upstream.hits(), 1);
    let seen = upstream.last_seen();
    assert_eq!(seen.target, "/api/x?q=1");
    assert_eq!(
        seen.header("host"),
        Some(upstream.address.to_string().as_str()),
        "Host is the instance's"
    );
}

#[test]
fn the_authority_of_an_absolute_form_target_is_never_dialed() {
    let upstream = Upstream::start("api");
    let decoy = Upstream::start("decoy");
    let gateway = start_gateway(&upstream, "/api", "");

    let request = format!(
        "GET http://{decoy}/api/x HTTP/1.1\r\nHost: {decoy}\r\nConnection: close\r\n\r\n",
        decoy = decoy.address
    );
    let reply = exchange(&gateway, request.as_bytes());
    assert_eq!(reply.status, Some(200), "{:?}", reply.raw);
    assert_eq!(reply.header("x-upstream-instance"), Some("api"));
    assert_eq!(upstream.last_seen().target, "/api/x");
    assert_eq!(decoy.hits(), 0, "the target's authority was dialed");

    // Its path is normalized like any other.
    let request = format!(
        "GET http://{decoy}/api/../api//y HTTP/1.1\r\nHost: {decoy}\r\nConnection: close\r\n\r\n",
        decoy = decoy.address
    );
    let reply = exchange(&gateway, request.as_bytes());
    assert_eq!(reply.status, Some(200), "{:?}", reply.raw);
    assert_eq!(upstream.last_seen().target, "/api/y");
    assert_eq!(decoy.hits(), 0);
}

// --- path normalization -------------------------------------------------

#[test]
fn paths_are_normalized_before_they_are_forwarded() {
    let upstream = Upstream::start("api");
    let gateway = start_gateway(&upstream, "/api", "");
    let cases = [
        ("/api//x", "/api/x"),
        ("/api///x//y", "/api/x/y"),
        ("//api/x", "/api/x"),
        ("/api/./x", "/api/x"),
        ("/api/a/../x", "/api/x"),
        ("/api/a/b/../../x", "/api/x"),
        ("/api/%2e%2e/api/x", "/api/x"),
        ("/api/%2E%2e/api/x", "/api/x"),
        ("/api/%2e/x", "/api/x"),
        ("/%61pi/x", "/api/x"),
        ("/api/%7Euser", "/api/~user"),
        ("/api/%41-%5a", "/api/A-Z"),
        ("/api/100%25", "/api/100%25"),
        ("/api/%252F", "/api/%252F"),
        ("/api/%252e%252e/x", "/api/%252e%252e/x"),
        ("/api/a%3Ab", "/api/a%3Ab"),
        ("/api/a%20b", "/api/a%20b"),
        ("/api/x/.", "/api/x/"),
        ("/api/x/", "/api/x/"),
        ("/api/..../x", "/api/..../x"),
    ];
    let mut problems = Vec::new();
    for (sent, forwarded) in cases {
        let before = upstream.hits();
        let reply = exchange(&gateway, &get_request(sent));
        if reply.status != Some(200) {
            problems.push(format!("{sent}: got {:?}", reply.status_line()));
            continue;
        }
        if upstream.hits() != before + 1 {
            problems.push(format!(
                "{sent}: the upstream saw {} requests",
                upstream.hits() - before
            ));
        }
        let target = upstream.last_seen().target;
        if target != forwarded {
            problems.push(format!("{sent}: forwarded as {target:?}, expected {forwarded:?}"));
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn the_query_string_is_forwarded_as_sent() {
    let upstream = Upstream::start("api");
    let gateway = start_gateway(&upstream, "/api", "");
    let cases = [
        ("/api/x?a=1&b=2", "/api/x?a=1&b=2"),
        (
            "/api//x/./y/../z?path=%2F..%2f&pct=%25&dots=../..&back=%5C",
            "/api/x/z?path=%2F..%2f&pct=%25&dots=../..&back=%5C",
        ),
        ("/api/x?q=%61%2e", "/api/x?q=%61%2e"),
        ("/api/x?", "/api/x?"),
        ("/api/x?a=/b//c", "/api/x?a=/b//c"),
    ];
    for (sent, forwarded) in cases {
        let reply = exchange(&gateway, &get_request(sent));
        assert_eq!(reply.status, Some(200), "{sent}: {:?}", reply.raw);
        assert_eq!(upstream.last_seen().target, forwarded, "{sent}");
    }
}

#[test]
fn the_normalized_path_is_the_one_matched() {
    let upstream = Upstream::start("api");
    let gateway = start_gateway(&upstream, "/api", "");

    let reply = exchange(&gateway, &get_request("/%61pi/x"));
    assert_eq!(reply.status, Some(200), "an encoded prefix still matches");
    assert_eq!(upstream.last_seen().target, "/api/x");

    for sent in ["/api/../admin/x", "/api/%2e%2e/admin", "/api/./../apix"] {
        let before = upstream.hits();
        let reply = exchange(&gateway, &get_request(sent));
        assert_eq!(reply.status, Some(404), "{sent}: {:?}", reply.raw);
        assert_eq!(reply.body, r#"{"error":"Not found"}"#, "{sent}");
        assert_eq!(upstream.hits(), before, "{sent} left /api: not forwarded");
    }
}

/// Sends each target to a gateway whose route `/` forwards everything;
/// each must get the JSON 400 and reach nobody.
fn assert_paths_refused(targets: &[&str]) {
    let upstream = Upstream::start("api");
    let gateway = start_gateway(&upstream, "/", "");
    let mut problems = Vec::new();
    for target in targets {
        let before = upstream.hits();
        let reply = exchange(&gateway, &get_request(target));
        if reply.status != Some(400) || reply.body != BAD_REQUEST {
            problems.push(format!(
                "{target}: expected 400 {BAD_REQUEST}, got {:?} {:?}",
                reply.status_line(),
                reply.body
            ));
        } else if reply.header("content-type") != Some("application/json") {
            problems.push(format!("{target}: Content-Type {:?}", reply.header("content-type")));
        }
        if upstream.hits() != before {
            problems.push(format!("{target}: the upstream saw {:?}", upstream.last_seen().target));
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn an_encoded_slash_or_backslash_in_the_path_gets_400() {
    assert_paths_refused(&[
        "/api/a%2Fb",
        "/api/a%2fb",
        "/api%2Fx",
        "/api/a%5Cb",
        "/api/a%5cb",
        "/api/%2F%2F",
    ]);
}

#[test]
fn an_encoded_control_character_in_the_path_gets_400() {
    assert_paths_refused(&[
        "/api/%00",
        "/api/a%00b",
        "/api/%0a",
        "/api/%0D%0AX-Injected:%20yes",
        "/api/%1f",
        "/api/%7f",
    ]);
}

#[test]
fn a_malformed_escape_in_the_path_gets_400() {
    assert_paths_refused(&["/api/%zz", "/api/x%", "/api/%4", "/api/%4g", "/api/%%41"]);
}

#[test]
fn dot_segments_that_climb_above_the_root_get_400() {
    assert_paths_refused(&[
        "/..",
        "/../api/x",
        "/api/../../x",
        "/api/../..",
        "/%2e%2e/x",
        "/api/%2e%2e/%2E%2E/x",
        "/api/x/../../../api/x",
    ]);
}

#[test]
fn raw_backslashes_and_control_bytes_in_the_path_are_refused() {
    // The HTTP parser may refuse these itself, with a bare 400.
    let upstream = Upstream::start("api");
    let gateway = start_gateway(&upstream, "/", "");
    let targets: [&[u8]; 5] = [
        b"/api/a\\b",
        b"/api\\..\\x",
        b"/api/a\x01b",
        b"/api/a\x00b",
        b"/api/a\x7fb",
    ];
    let mut problems = Vec::new();
    for target in targets {
        let shown = String::from_utf8_lossy(target).into_owned();
        let mut request = b"GET ".to_vec();
        request.extend_from_slice(target);
        request.extend_from_slice(b" HTTP/1.1\r\nHost: gatehouse.test\r\nConnection: close\r\n\r\n");
        let before = upstream.hits();
        let reply = exchange(&gateway, &request);
        if reply.status != Some(400) {
            problems.push(format!("{shown:?}: got {:?}", reply.status_line()));
        } else if !(reply.body.is_empty() || reply.body == BAD_REQUEST) {
            problems.push(format!("{shown:?}: body {:?}", reply.body));
        }
        if upstream.hits() != before {
            problems.push(format!("{shown:?}: the upstream saw {:?}", upstream.last_seen().target));
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

// --- server.max_header_bytes --------------------------------------------

/// A GET whose head (request line, headers, blank line) is exactly `size`
/// bytes on the wire, padded with an `X-Pad` header.
fn head_of_size(size: usize) -> String {
    let start = "GET /api/x HTTP/1.1\r\nHost: gatehouse.test\r\nConnection: close\r\nX-Pad: ";
    let end = "\r\n\r\n";
    let pad = size - start.len() - end.len();
    let head = format!("{start}{}{end}", "p".repeat(pad));
    assert_eq!(head.len(), size);
    head
}

#[test]
fn a_request_head_over_max_header_bytes_gets_431() {
    let upstream = Upstream::start("api");
    let gateway = start_gateway(&upstream, "/api", "max_header_bytes = 1024");

    for size in [2000, 1025] {
        let reply = exchange(&gateway, head_of_size(size).as_bytes());
        assert_eq!(reply.status, Some(431), "{size} bytes: {:?}", reply.raw);
        assert_eq!(
            reply.body, r#"{"error":"Request header fields too large"}"#,
            "{size} bytes"
        );
        assert_eq!(reply.header("content-type"), Some("application/json"));
    }
    assert_eq!(upstream.hits(), 0);
}

#[test]
fn a_request_head_within_max_header_bytes_passes() {
    let upstream = Upstream::start("api");
    let gateway = start_gateway(&upstream, "/api", "max_header_bytes = 1024");

    for size in [1000, 1024] {
        let reply = exchange(&gateway, head_of_size(size).as_bytes());
        assert_eq!(reply.status, Some(200), "{size} bytes: {:?}", reply.raw);
        let seen = upstream.last_seen();
        assert_eq!(seen.target, "/api/x");
        assert_eq!(
            seen.header("x-pad").map(str::len),
            head_of_size(size)
                .lines()
                .find_map(|line| line.strip_prefix("X-Pad: "))
                .map(str::len),
            "{size} bytes: the header arrived whole"
        );
    }
    assert_eq!(upstream.hits(), 2);
}

#[test]
fn a_request_head_beyond_the_parsers_own_cap_gets_431() {
    let upstream = Upstream::start("api");
    let gateway = start_gateway(&upstream, "/api", "max_header_bytes = 1048576");

    // 128 KiB of an unfinished head: the parser's buffer is full and it can
    // never end; the gateway answers instead of waiting for more.
    let start = "GET /api/x HTTP/1.1\r\nHost: gatehouse.test\r\nX-Pad: ";
    let head = format!("{start}{}", "p".repeat(128 * 1024 - start.len()));
    let reply = exchange(&gateway, head.as_bytes());
    assert_eq!(reply.status, Some(431), "{:?}", reply.status_line());
    assert!(
        reply.body.is_empty() || reply.body == r#"{"error":"Request header fields too large"}"#,
        "{:?}",
        reply.body
    );
    assert!(reply.closed_promptly(), "{:?}", reply.elapsed);
    assert_eq!(upstream.hits(), 0);
}

// --- malformed chunked bodies, and what the log says ----------------------

/// A chunked upload's head, without its body.
const CHUNKED_HEAD: &[u8] = b"POST /api/upload HTTP/1.1\r\nHost: gatehouse.test\r\nTransfer-Encoding: chunked\r\n\r\n";

/// Chunked bodies the decoder refuses.
fn malformed_chunked_bodies() -> [(&'static str, Vec<u8>); 3] {
    let mut after_a_good_chunk = b"400\r\n".to_vec();
    after_a_good_chunk.extend_from_slice(&pattern(1024));
    after_a_good_chunk.extend_from_slice(b"\r\nzz\r\nhello\r\n0\r\n\r\n");
    [
        ("a chunk size that is not hex", b"zz\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("chunk data longer than its size", b"5\r\nhelloXX\r\n0\r\n\r\n".to_vec()),
        ("a bad chunk size after a good 1 KiB chunk", after_a_good_chunk),
    ]
}

/// Writes `head`, waits `pause` (if any), writes `body`, and reads until the
/// gateway closes the connection (or [`READ_LIMIT`] passes).
fn exchange_in_two_writes(gateway: &TestGateway, head: &[u8], body: &[u8], pause: Option<Duration>) -> RawReply {
    use std::io::{Read, Write};
    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect(gateway.address).unwrap();
    stream.set_read_timeout(Some(READ_LIMIT)).unwrap();
    match pause {
        None => stream.write_all(&[head, body].concat()).unwrap(),
        Some(pause) => {
            stream.write_all(head).unwrap();
            std::thread::sleep(pause);
            // The gateway may have given up already; the reply tells.
            let _ = stream.write_all(body);
        }
    }
    let mut received = Vec::new();
    let _ = stream.read_to_end(&mut received);
    parse_reply(String::from_utf8_lossy(&received).into_owned(), started.elapsed())
}

#[test]
fn a_malformed_chunked_body_gets_400_whether_it_comes_with_the_head_or_after_it() {
    // actix-http closes the connection on a chunk it cannot decode, after one
    // last look at the request; the gateway must have its 400 ready by then
    // whether the request was still waiting on something else (body in the
    // same read as the head) or already streaming the body upstream.
    let upstream = Upstream::start("api");
    let gateway = start_gateway(&upstream, "/api", "");
    let mut problems = Vec::new();
    for (what, body) in malformed_chunked_bodies() {
        for pause in [None, Some(Duration::from_millis(300))] {
            let reply = exchange_in_two_writes(&gateway, CHUNKED_HEAD, &body, pause);
            let case = match pause {
                None => format!("{what}, in the same write as the head"),
                Some(pause) => format!("{what}, {pause:?} after the head"),
            };
            if reply.status_line() != "HTTP/1.1 400 Bad Request" || reply.body != BAD_REQUEST {
                problems.push(format!("{case}: {:?}", reply.raw));
            } else if reply.header("content-type") != Some("application/json") {
                problems.push(format!("{case}: Content-Type {:?}", reply.header("content-type")));
            } else if !reply.closed_promptly() {
                problems.push(format!("{case}: closed after {:?}", reply.elapsed));
            }
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// Requests the gateway refuses with 400, and the debug line each one gets.
fn malformed_requests() -> Vec<(String, Vec<u8>, &'static str)> {
    const PARSER: &str = "malformed request rejected";
    const BODY: &str = "the client's chunked body failed";
    let mut requests: Vec<(String, Vec<u8>, &'static str)> = [
        (
            "two Content-Lengths",
            framed("Content-Length: 1\r\nContent-Length: 2\r\n", "ab"),
        ),
        (
            "Content-Length and Transfer-Encoding",
            framed("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"),
        ),
        ("an obs-folded header", framed("X-Folded: a\r\n b\r\n", "")),
        ("two Host lines", framed("Host: gatehouse.test\r\n", "")),
        (
            "a space in the target",
            "GET /api/a b HTTP/1.1\r\nHost: gatehouse.test\r\n\r\n".to_owned(),
        ),
        (
            "an unknown HTTP version",
            "GET /api/x HTTP/9.9\r\nHost: gatehouse.test\r\n\r\n".to_owned(),
        ),
    ]
    .into_iter()
    .map(|(what, request)| (what.to_owned(), request.into_bytes(), PARSER))
    .collect();
    requests.push((
        "a TLS hello on the plain port".to_owned(),
        [&b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..], &[0; 40]].concat(),
        PARSER,
    ));
    for (what, body) in malformed_chunked_bodies() {
        requests.push((what.to_owned(), [CHUNKED_HEAD, &body].concat(), BODY));
    }
    requests
}

#[test]
fn malformed_requests_are_logged_at_debug_never_as_warnings_or_errors() {
    // SPEC §3: a client must not be able to fill the error log.
    let upstream = Upstream::start("api");
    let config = format!(
        "[services.api]\ninstances = {}\n[routes.api]\nprefix = \"/api\"\nservice = \"api\"\n",
        instances(&[&upstream])
    );
    let requests = malformed_requests();
    for level in ["info", "debug"] {
        let mut gateway = GatewayProcess::builder().env("GATEHOUSE_LOG", level).start(&config);
        let mut expected_lines: Vec<&str> = Vec::new();
        for (what, request, debug_line) in requests.iter().cycle().take(50) {
            let raw = raw_exchange(gateway.address, request, READ_LIMIT);
            assert!(raw.starts_with("HTTP/1.1 400 "), "{what}: {raw:?}");
            expected_lines.push(debug_line);
        }
        let log = gateway.stop_and_read_log();
        let loud: Vec<&str> = log
            .lines()
            .filter(|line| line.contains(" ERROR ") || line.contains(" WARN "))
            .collect();
        assert!(loud.is_empty(), "GATEHOUSE_LOG={level}: {loud:#?}");
        for debug_line in ["malformed request rejected", "the client's chunked body failed"] {
            let logged = log
                .lines()
                .filter(|line| line.contains(" DEBUG ") && line.contains(debug_line))
                .count();
            let expected = match level {
                "debug" => expected_lines.iter().filter(|line| **line == debug_line).count(),
                _ => 0,
            };
            assert_eq!(logged, expected, "GATEHOUSE_LOG={level}: {debug_line:?} lines");
        }
    }
}

// --- server.max_body_bytes ----------------------------------------------

#[test]
fn a_declared_body_over_max_body_bytes_gets_413_and_never_reaches_the_upstream() {
    let upstream = Upstream::start("api");
    let gateway = start_gateway(&upstream, "/api", "max_body_bytes = 1000");

    let reply = exchange(&gateway, &post_request("/api/upload", &pattern(1001)));
    assert_eq!(reply.status, Some(413), "{:?}", reply.raw);
    assert_eq!(reply.body, r#"{"error":"Payload too large"}"#);
    assert_eq!(reply.header("content-type"), Some("application/json"));

    // Declared, not sent: the answer does not wait for the body.
    let reply = exchange(
        &gateway,
        b"POST /api/upload HTTP/1.1\r\nHost: gatehouse.test\r\nContent-Length: 10485760\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(reply.status, Some(413), "{:?}", reply.raw);
    assert_eq!(reply.body, r#"{"error":"Payload too large"}"#);
    assert!(reply.closed_promptly(), "{:?}", reply.elapsed);

    assert_eq!(upstream.hits(), 0);
}

#[test]
fn a_chunked_body_growing_past_max_body_bytes_gets_413() {
    let upstream = Upstream::start("api");
    let gateway = start_gateway(&upstream, "/api", "max_body_bytes = 1000");

    let body = pattern(1200);
    let reply = exchange(&gateway, &chunked_request("/api/upload", &[&body[..600], &body[600..]]));
    assert_eq!(reply.status, Some(413), "{:?}", reply.raw);
    assert_eq!(reply.body, r#"{"error":"Payload too large"}"#);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    for seen in upstream.seen() {
        assert!(
            seen.body_len <= 1000,
            "the upstream got {} bytes, over the limit",
            seen.body_len
        );
    }

    // One chunk alone over the limit.
    let reply = exchange(&gateway, &chunked_request("/api/upload", &[&body]));
    assert_eq!(reply.status, Some(413), "{:?}", reply.raw);
    assert_eq!(reply.body, r#"{"error":"Payload too large"}"#);
    for seen in upstream.seen() {
        assert!(seen.body_len <= 1000, "{} bytes upstream", seen.body_len);
    }
}

#[test]
fn a_body_of_exactly_max_body_bytes_passes_intact() {
    let upstream = Upstream::start("api");
    let gateway = start_gateway(&upstream, "/api", "max_body_bytes = 1000");
    let body = pattern(1000);

    let reply = exchange(&gateway, &post_request("/api/upload", &body));
    assert_eq!(reply.status, Some(200), "{:?}", reply.raw);
    let seen = upstream.last_seen();
    assert_eq!(seen.body_len, 1000);
    assert_eq!(seen.body_sha256, pattern_sha256(1000));

    let reply = exchange(
        &gateway,
        &chunked_request("/api/upload", &[&body[..1], &body[1..400], &body[400..]]),
    );
    assert_eq!(reply.status, Some(200), "{:?}", reply.raw);
    let seen = upstream.last_seen();
    assert_eq!(seen.body_len, 1000);
    assert_eq!(seen.body_sha256, pattern_sha256(1000));
    assert_eq!(upstream.hits(), 2);
}

// --- server.client_request_timeout_ms -----------------------------------

#[test]
fn a_stalled_request_head_gets_408_or_is_closed() {
    let upstream = Upstream::start("api");
    let gateway = start_gateway(&upstream, "/api", "client_request_timeout_ms = 300");

    for (name, partial) in [
        ("half a head", &b"GET /api/x HTTP/1.1\r\nHost: gatehouse.test\r\n"[..]),
        ("half a request line", &b"GET /api/x HT"[..]),
    ] {
        let reply = exchange(&gateway, partial);
        assert!(reply.closed_promptly(), "{name}: still open after {:?}", reply.elapsed);
        assert!(
            reply.raw.is_empty() || reply.status == Some(408),
            "{name}: {:?}",
            reply.raw
        );
    }
    assert_eq!(upstream.hits(), 0);
}

#[test]
fn a_connection_that_sends_nothing_is_closed_after_the_head_timeout() {
    let upstream = Upstream::start("api");
    let gateway = start_gateway(&upstream, "/api", "client_request_timeout_ms = 300");

    // Several idle connections, opened at different moments.
    let replies: Vec<RawReply> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6u64)
            .map(|i| {
                let gateway = &gateway;
                scope.spawn(move || {
                    std::thread::sleep(Duration::from_millis(90 * i));
                    exchange(gateway, b"")
                })
            })
            .collect();
        handles.into_iter().map(|handle| handle.join().unwrap()).collect()
    });
    let mut problems = Vec::new();
    for (i, reply) in replies.iter().enumerate() {
        if !reply.closed_promptly() {
            problems.push(format!("idle connection {i}: still open after {:?}", reply.elapsed));
        } else if !(reply.raw.is_empty() || reply.status == Some(408)) {
            problems.push(format!("idle connection {i}: {:?}", reply.raw));
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn a_complete_request_is_never_answered_408_under_a_short_head_timeout() {
    let upstream = Upstream::start("api");
    let gateway = start_gateway(&upstream, "/api", "client_request_timeout_ms = 300");

    // Each head is written whole, at once, right after connecting.
    let mut statuses = std::collections::BTreeMap::new();
    for round in 0..40 {
        let reply = exchange(&gateway, &get_request("/api/x"));
        *statuses.entry(reply.status_line().to_owned()).or_insert(0) += 1;
        if round % 10 == 9 {
            // Let the server's clock move on between batches.
            std::thread::sleep(Duration::from_millis(170));
        }
    }
    assert_eq!(statuses.keys().collect::<Vec<_>>(), ["HTTP/1.1 200 OK"], "{statuses:?}");
    assert_eq!(upstream.hits(), 40);
}

#[actix_web::test]
async fn the_head_timeout_does_not_cut_a_slow_upstream() {
    let upstream = Upstream::start("api");
    let gateway = start_gateway(&upstream, "/api", "client_request_timeout_ms = 1000");

    let reply = get(&gateway.url("/api/slow/1500")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(upstream.last_seen().target, "/api/slow/1500");
}

// --- the gateway's own errors -------------------------------------------

#[test]
fn the_gateways_own_errors_carry_the_security_headers_and_a_request_id() {
    let upstream = Upstream::start("api");
    let gateway = start_gateway(&upstream, "/api", "max_header_bytes = 1024\nmax_body_bytes = 1000");
    let cases: [(&str, Vec<u8>, u16); 4] = [
        ("bad path", get_request("/api/a%2Fb"), 400),
        ("no route", get_request("/nowhere"), 404),
        ("body too large", post_request("/api/x", &pattern(1001)), 413),
        ("head too large", head_of_size(2000).into_bytes(), 431),
    ];
    let mut problems = Vec::new();
    for (name, request, status) in cases {
        for id in [None, Some("framing-test.1_A")] {
            let request = match id {
                None => request.clone(),
                Some(id) => {
                    // Insert the id right after the request line.
                    let at = request.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
                    let mut with_id = request[..at].to_vec();
                    with_id.extend_from_slice(format!("X-Request-Id: {id}\r\n").as_bytes());
                    with_id.extend_from_slice(&request[at..]);
                    with_id
                }
            };
            let reply = exchange(&gateway, &request);
            let case = format!("{name} (id {id:?})");
            if reply.status != Some(status) {
                problems.push(format!("{case}: got {:?}", reply.status_line()));
                continue;
            }
            if reply.header("content-type") != Some("application/json") {
                problems.push(format!("{case}: Content-Type {:?}", reply.header("content-type")));
            }
            for (header_name, value) in SECURITY_HEADERS {
                if reply.header(header_name) != Some(value) {
                    problems.push(format!("{case}: {header_name} is {:?}", reply.header(header_name)));
                }
            }
            for absent in ["server", "x-powered-by"] {
                if let Some(value) = reply.header(absent) {
                    problems.push(format!("{case}: {absent}: {value}"));
                }
            }
            match (id, reply.header("x-request-id")) {
                (Some(id), Some(echoed)) if echoed == id => {}
                (None, Some(generated)) if is_uuid(generated) => {}
                (_, other) => problems.push(format!("{case}: X-Request-Id {other:?}")),
            }
        }
    }
    assert_eq!(upstream.hits(), 0);
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}
