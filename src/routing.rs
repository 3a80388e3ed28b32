//! Path normalization and the longest-prefix route table (SPEC §3 steps 2–3).
//!
//! Both are pure functions over strings: the request path is normalized once,
//! and the normalized form is the one matched and the one forwarded, so a
//! route's view of a path and the upstream's can never disagree.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::HeaderValue;
use actix_web::http::Method;

/// Why a request path is refused with 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPath {
    #[error("path is not absolute")]
    NotAbsolute,
    #[error("malformed percent-escape")]
    MalformedEscape,
    #[error("encoded slash")]
    EncodedSlash,
    #[error("backslash or encoded backslash")]
    EncodedSeparator,
    #[error("control character")]
    ControlCharacter,
    #[error("dot segments climb above the root")]
    AboveRoot,
}

/// Normalizes a raw request path: decodes percent-escapes of unreserved
/// characters only, merges repeated slashes and resolves dot segments
/// (RFC 3986 §5.2.4). Nothing is decoded twice: `%25` stays `%25`.
///
/// Paths that need no change are returned borrowed.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, InvalidPath> {
    normalize(raw, false)
}

/// As [`normalize_path`], for routes with `allow_encoded_slash`: `%2F` is
/// kept encoded, as part of its segment, and never treated as a separator.
pub fn normalize_path_keeping_encoded_slashes(raw: &str) -> Result<Cow<'_, str>, InvalidPath> {
    normalize(raw, true)
}

fn normalize(raw: &str, keep_encoded_slashes: bool) -> Result<Cow<'_, str>, InvalidPath> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(InvalidPath::NotAbsolute);
    }
    let mut needs_work = false;
    let mut previous = 0u8;
    for (i, &byte) in bytes.iter().enumerate() {
        match byte {
            b'\\' => return Err(InvalidPath::EncodedSeparator),
            0..=0x1f | 0x7f => return Err(InvalidPath::ControlCharacter),
            b'%' => needs_work = true,
            b'/' if previous == b'/' => needs_work = true,
            b'.' if previous == b'/' && is_dot_segment_start(&bytes[i..]) => needs_work = true,
            _ => {}
        }
        previous = byte;
    }
    if !needs_work {
        return Ok(Cow::Borrowed(raw));
    }
    let decoded = decode_unreserved(bytes, keep_encoded_slashes)?;
    Ok(Cow::Owned(resolve_segments(&decoded)?))
}

/// True when `rest` (starting at a `.` right after a `/`) is a whole `.` or
/// `..` segment.
fn is_dot_segment_start(rest: &[u8]) -> bool {
    matches!(rest, [b'.'] | [b'.', b'/', ..] | [b'.', b'.'] | [b'.', b'.', b'/', ..])
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// Decodes `%XX` where XX is an unreserved character; keeps every other
/// escape as sent, refusing encoded separators (`%2F` unless kept) and
/// control characters.
fn decode_unreserved(bytes: &[u8], keep_encoded_slashes: bool) -> Result<String, InvalidPath> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        if byte != b'%' {
            out.push(byte);
            i += 1;
            continue;
        }
        let (Some(high), Some(low)) = (
            bytes.get(i + 1).copied().and_then(hex_value),
            bytes.get(i + 2).copied().and_then(hex_value),
        ) else {
            return Err(InvalidPath::MalformedEscape);
        };
        let value = high << 4 | low;
        match value {
            b'/' if keep_encoded_slashes => out.extend_from_slice(&bytes[i..i + 3]),
            b'/' => return Err(InvalidPath::EncodedSlash),
            b'\\' => return Err(InvalidPath::EncodedSeparator),
            0..=0x1f | 0x7f => return Err(InvalidPath::ControlCharacter),
            v if is_unreserved(v) => out.push(v),
            _ => out.extend_from_slice(&bytes[i..i + 3]),
        }
        i += 3;
    }
    // Only ASCII bytes were replaced, so UTF-8 input stays UTF-8.
    Ok(String::from_utf8(out).expect("decoding unreserved escapes keeps UTF-8 intact"))
}

/// Merges repeated slashes and resolves `.` and `..` segments; a `..` above
/// the root is an error rather than silently dropped.
fn resolve_segments(path: &str) -> Result<String, InvalidPath> {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in path.split('/').skip(1) {
        trailing_slash = false;
        match segment {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                segments.pop().ok_or(InvalidPath::AboveRoot)?;
                trailing_slash = true;
            }
            other => segments.push(other),
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// The host the client addressed (RFC 9112 §3.2–3.3): an absolute-form
/// target's authority, else the `Host` header. `Err` for a value that is not
/// `host[:port]`, and for an HTTP/1.1 request without a host; `Ok(None)` for
/// an HTTP/1.0 request without one.
pub fn request_host<'a>(
    uri: &'a actix_web::http::Uri,
    host_header: Option<&'a HeaderValue>,
    version: actix_web::http::Version,
) -> Result<Option<&'a str>, InvalidHost> {
    let host = match (uri.authority(), host_header) {
        (Some(authority), _) => authority.as_str(),
        (None, Some(value)) => value.to_str().map_err(|_| InvalidHost)?,
        (None, None) if version == actix_web::http::Version::HTTP_10 => return Ok(None),
        (None, None) => return Err(InvalidHost),
    };
    if is_valid_host(host) {
        Ok(Some(host))
    } else {
        Err(InvalidHost)
    }
}

/// A `Host` that is not `host[:port]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid host")]
pub struct InvalidHost;

/// `host[:port]`: a bracketed IPv6 literal, or a non-empty DNS name or IPv4
/// address (letters, digits, `.`, `-`, `_`). RFC 3986 would also let
/// sub-delimiters through, but `a.example,b.example` in `X-Forwarded-Host`
/// reads as a list to many back ends and `*` as a wildcard, so only what a
/// DNS name can hold passes; no user info, path, space or control character.
fn is_valid_host(text: &str) -> bool {
    let is_name_byte = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_');
    let is_literal_byte = |b: u8| b.is_ascii_hexdigit() || b == b':' || b == b'.';
    let (host_is_valid, port) = match text.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((literal, after)) if after.is_empty() || after.starts_with(':') => (
                !literal.is_empty() && literal.bytes().all(is_literal_byte),
                after.strip_prefix(':').unwrap_or(after),
            ),
            _ => return false,
        },
        None => {
            let (host, port) = text.rsplit_once(':').unwrap_or((text, ""));
            (!host.is_empty() && host.bytes().all(is_name_byte), port)
        }
    };
    host_is_valid && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit())
}

/// SPEC §3 step 3: `path` equals `prefix`, or continues it after a `/`; a
/// prefix ending in `/` matches every path that starts with it.
pub fn prefix_matches(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
    }
}

/// The path forwarded upstream when a route strips its prefix.
pub fn strip_route_prefix<'a>(path: &'a str, prefix: &str) -> Cow<'a, str> {
    let rest = &path[prefix.len().min(path.len())..];
    if rest.starts_with('/') {
        Cow::Borrowed(rest)
    } else {
        Cow::Owned(format!("/{rest}"))
    }
}

/// One entry of a route's `hosts`: an exact name, or `*.` and a suffix that
/// matches one more label. Stored lower-case, without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// The suffix with its leading dot: `.example.com` for `*.example.com`.
    Wildcard(String),
}

/// How well a route's `hosts` match a request (SPEC §3 step 3): an exact
/// name beats a wildcard, which beats a route without `hosts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HostRank {
    AnyHost,
    Wildcard,
    Exact,
}

impl HostPattern {
    /// `Err` says why `text` is neither a host name nor `*.` and one.
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        let lower = text.trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(name) => (true, name),
            None => (false, lower.as_str()),
        };
        let is_label = |label: &str| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.is_empty() || !name.split('.').all(is_label) {
            return Err("is not a host name (letters, digits, '-', '.'; no port), nor \"*.\" and one");
        }
        Ok(if wildcard {
            Self::Wildcard(format!(".{name}"))
        } else {
            Self::Exact(name.to_owned())
        })
    }

    /// `host` is the request's host without port or trailing dot, in any case.
    fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(name) => host.eq_ignore_ascii_case(name),
            Self::Wildcard(suffix) => {
                host.len() > suffix.len() && {
                    let (label, rest) = host.split_at(host.len() - suffix.len());
                    rest.eq_ignore_ascii_case(suffix) && !label.contains('.')
                }
            }
        }
    }
}

/// The host name of a `host[:port]` (an already validated request host):
/// the port and a trailing dot removed; an IPv6 literal keeps its brackets.
pub fn host_name(host: &str) -> &str {
    let name = if host.starts_with('[') {
        host.split_once(']')
            .map_or(host, |(literal, _)| &host[..literal.len() + 1])
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    name.strip_suffix('.').unwrap_or(name)
}

/// A method as configured in a route's `methods`: letter case is ignored
/// (`get` is `GET`); `None` for anything that is not an HTTP token.
pub fn parse_method(text: &str) -> Option<Method> {
    Method::from_bytes(text.to_ascii_uppercase().as_bytes()).ok()
}

/// A configured route, compiled once at start-up.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    pub prefix: String,
    /// Index of the route's service in the gateway's service list.
    pub service: usize,
    pub auth: bool,
    pub roles: Vec<String>,
    /// `None` allows every method.
    pub methods: Option<Vec<Method>>,
    pub strip_prefix: bool,
    /// Send the client's `Host` upstream, and leave `Location` alone.
    pub preserve_host: bool,
    /// `%2F` stays encoded in this route's paths instead of being refused.
    pub allow_encoded_slash: bool,
    /// helmet's headers on this route's responses.
    pub security_headers: bool,
    /// The route's own policy, an index into the gateway's policies.
    pub rate_limit: Option<usize>,
    /// Empty: any host.
    pub hosts: Vec<HostPattern>,
    /// WebSocket upgrades are tunnelled.
    pub websocket: bool,
    /// The response-head timeout of this route's requests.
    pub request_timeout: Duration,
    /// The route answers CORS itself.
    pub cors: Option<crate::cors::CorsPolicy>,
}

/// What a route without `methods` allows, as listed in `Allow`: every
/// method but `TRACE` (it echoes the request, credentials included) and
/// `CONNECT` (a tunnel), which only a route listing them accepts.
const METHODS_OF_AN_OPEN_ROUTE: [&str; 7] = ["DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"];

/// The `Allow` value of a route without `methods`.
pub const ALLOW_OF_AN_OPEN_ROUTE: HeaderValue =
    HeaderValue::from_static("DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT");

impl Route {
    /// `None` when the route does not answer for `host` (the request's host
    /// name, see [`host_name`]; `None` for a request without one).
    fn host_rank(&self, host: Option<&str>) -> Option<HostRank> {
        if self.hosts.is_empty() {
            return Some(HostRank::AnyHost);
        }
        let host = host?;
        self.hosts
            .iter()
            .filter(|pattern| pattern.matches(host))
            .map(|pattern| match pattern {
                HostPattern::Exact(_) => HostRank::Exact,
                HostPattern::Wildcard(_) => HostRank::Wildcard,
            })
            .max()
    }

    fn allows(&self, method: &Method) -> bool {
        match &self.methods {
            Some(methods) => methods.contains(method),
            None => *method != Method::TRACE && *method != Method::CONNECT,
        }
    }

    fn allowed_methods(&self) -> impl Iterator<Item = &str> {
        let (listed, open): (&[Method], &[&str]) = match &self.methods {
            Some(methods) => (methods, &[]),
            None => (&[], &METHODS_OF_AN_OPEN_ROUTE),
        };
        listed.iter().map(Method::as_str).chain(open.iter().copied())
    }
}

/// What the route table says about one request.
#[derive(Debug)]
pub enum RouteMatch<'a> {
    Found(&'a Arc<Route>),
    /// Routes match the path but none allows the method; the `Allow` value.
    MethodNotAllowed(HeaderValue),
    NotFound,
}

/// Routes ordered longest prefix first, so the first allowed match of a host
/// rank is the longest one.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
    /// No route has `hosts`: the first allowed match wins outright.
    any_route_has_hosts: bool,
}

impl RouteTable {
    pub fn new(mut routes: Vec<Route>) -> Self {
        routes.sort_by(|a, b| b.prefix.len().cmp(&a.prefix.len()).then_with(|| a.name.cmp(&b.name)));
        Self {
            any_route_has_hosts: routes.iter().any(|route| !route.hosts.is_empty()),
            routes: routes.into_iter().map(Arc::new).collect(),
        }
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// The best route for `path` on `host` (the request's host name, see
    /// [`host_name`]) among those that allow `method`: the best host rank,
    /// then the longest prefix.
    pub fn lookup(&self, path: &str, host: Option<&str>, method: &Method) -> RouteMatch<'_> {
        let mut path_matched = false;
        let mut best: Option<(HostRank, &Arc<Route>)> = None;
        for route in &self.routes {
            if !prefix_matches(path, &route.prefix) {
                continue;
            }
            let Some(rank) = route.host_rank(host) else {
                continue;
            };
            if !route.allows(method) {
                path_matched = true;
                continue;
            }
            if best.is_none_or(|(best_rank, _)| rank > best_rank) {
                best = Some((rank, route));
            }
            if rank == HostRank::Exact || !self.any_route_has_hosts {
                break;
            }
        }
        match best {
            Some((_, route)) => RouteMatch::Found(route),
            None if path_matched => RouteMatch::MethodNotAllowed(self.allowed_methods(path, host)),
            None => RouteMatch::NotFound,
        }
    }

    /// The best route for `path` on `host` whatever the method: the route a
    /// CORS preflight asks about (SPEC §10).
    pub fn lookup_any_method(&self, path: &str, host: Option<&str>) -> Option<&Arc<Route>> {
        let mut best: Option<(HostRank, &Arc<Route>)> = None;
        for route in &self.routes {
            if !prefix_matches(path, &route.prefix) {
                continue;
            }
            if let Some(rank) = route.host_rank(host) {
                if best.is_none_or(|(best_rank, _)| rank > best_rank) {
                    best = Some((rank, route));
                }
            }
        }
        best.map(|(_, route)| route)
    }

    fn allowed_methods(&self, path: &str, host: Option<&str>) -> HeaderValue {
        let mut allowed: Vec<&str> = self
            .routes
            .iter()
            .filter(|route| prefix_matches(path, &route.prefix) && route.host_rank(host).is_some())
            .flat_map(|route| route.allowed_methods())
            .collect();
        allowed.sort_unstable();
        allowed.dedup();
        HeaderValue::from_str(&allowed.join(", ")).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_paths_as_the_spec_says() {
        let cases: &[(&str, Result<&str, InvalidPath>)] = &[
            ("/", Ok("/")),
            ("/api/users/7", Ok("/api/users/7")),
            ("/api//users///7", Ok("/api/users/7")),
            ("//api/users", Ok("/api/users")),
            ("/api/./users", Ok("/api/users")),
            ("/api/users/.", Ok("/api/users/")),
            ("/api/x/../users", Ok("/api/users")),
            ("/api/users/x/..", Ok("/api/users/")),
            ("/api/%2e%2e/admin", Ok("/admin")),
            ("/api/%2E%2e/admin", Ok("/admin")),
            ("/api/users/%2e", Ok("/api/users/")),
            ("/%61pi/users", Ok("/api/users")),
            ("/api/%7Euser", Ok("/api/~user")),
            ("/api/%25", Ok("/api/%25")),
            ("/api/%252F", Ok("/api/%252F")),
            ("/api/%20space", Ok("/api/%20space")),
            ("/api/..../x", Ok("/api/..../x")),
            ("/api/.hidden", Ok("/api/.hidden")),
            ("/api/users%2F7", Err(InvalidPath::EncodedSlash)),
            ("/api/users%2f7", Err(InvalidPath::EncodedSlash)),
            ("/api/users%5C7", Err(InvalidPath::EncodedSeparator)),
            ("/api/users%5c7", Err(InvalidPath::EncodedSeparator)),
            ("/api\\users", Err(InvalidPath::EncodedSeparator)),
            ("/api/%00", Err(InvalidPath::ControlCharacter)),
            ("/api/%0a", Err(InvalidPath::ControlCharacter)),
            ("/api/%7f", Err(InvalidPath::ControlCharacter)),
            ("/api/\u{1}", Err(InvalidPath::ControlCharacter)),
            ("/api/%", Err(InvalidPath::MalformedEscape)),
            ("/api/%4", Err(InvalidPath::MalformedEscape)),
            ("/api/%zz", Err(InvalidPath::MalformedEscape)),
            ("/..", Err(InvalidPath::AboveRoot)),
            ("/api/../..", Err(InvalidPath::AboveRoot)),
            ("/api/../../etc/passwd", Err(InvalidPath::AboveRoot)),
            ("/%2e%2e/etc", Err(InvalidPath::AboveRoot)),
            ("api", Err(InvalidPath::NotAbsolute)),
            ("*", Err(InvalidPath::NotAbsolute)),
        ];
        for (raw, expected) in cases {
            let got = normalize_path(raw);
            assert_eq!(got.as_deref().map_err(|e| *e), *expected, "normalizing {raw:?}");
        }
    }

    #[test]
    fn hosts_must_be_a_name_or_address_with_an_optional_port() {
        let valid = [
            "example.com",
            "example.com:8080",
            "127.0.0.1",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:8080",
            "xn--bcher-kva.example",
            "a_b.example",
            "localhost:",
        ];
        let invalid = [
            "",
            "a b",
            "evil.example/../x",
            "127.0.0.1@evil.example",
            "user:pw@host",
            "host:80:80",
            "host:http",
            "host:123456",
            "[::1",
            "[zz]",
            "[::1]x",
            ":80",
            "host\\x",
            "host?x",
            "host#x",
            "evil.example,good.example",
            "*.example",
            "a;b",
        ];
        for host in valid {
            assert!(is_valid_host(host), "{host:?} should be valid");
        }
        for host in invalid {
            assert!(!is_valid_host(host), "{host:?} should be invalid");
        }
    }

    #[test]
    fn the_host_is_the_absolute_targets_authority_else_the_header() {
        use actix_web::http::{Uri, Version};
        let origin_form: Uri = "/x".parse().unwrap();
        let absolute: Uri = "http://target.example:81/x".parse().unwrap();
        let header = HeaderValue::from_static("header.example");
        assert_eq!(
            request_host(&origin_form, Some(&header), Version::HTTP_11),
            Ok(Some("header.example"))
        );
        assert_eq!(
            request_host(&absolute, Some(&header), Version::HTTP_11),
            Ok(Some("target.example:81"))
        );
        assert_eq!(request_host(&origin_form, None, Version::HTTP_11), Err(InvalidHost));
        assert_eq!(request_host(&origin_form, None, Version::HTTP_10), Ok(None));
        let userinfo: Uri = "http://me@target.example/x".parse().unwrap();
        assert_eq!(request_host(&userinfo, None, Version::HTTP_11), Err(InvalidHost));
    }

    #[test]
    fn clean_paths_are_not_copied() {
        assert!(matches!(normalize_path("/api/users/7?"), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize_path("/api/v1.2/x"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        let cases = [
            ("/api/users", "/api/users", true),
            ("/api/users/7", "/api/users", true),
            ("/api/usersx", "/api/users", false),
            ("/api/user", "/api/users", false),
            ("/API/users", "/api/users", false),
            ("/anything", "/", true),
            ("/api/x", "/api/", true),
            ("/api", "/api/", false),
        ];
        for (path, prefix, expected) in cases {
            assert_eq!(prefix_matches(path, prefix), expected, "{path:?} against {prefix:?}");
        }
    }

    fn route(name: &str, prefix: &str, methods: &[&str]) -> Route {
        Route {
            name: name.into(),
            prefix: prefix.to_owned(),
            service: 0,
            auth: false,
            roles: Vec::new(),
            methods: (!methods.is_empty()).then(|| {
                methods
                    .iter()
                    .map(|m| Method::from_bytes(m.as_bytes()).unwrap())
                    .collect()
            }),
            strip_prefix: false,
            preserve_host: false,
            allow_encoded_slash: false,
            security_headers: true,
            rate_limit: None,
            hosts: Vec::new(),
            websocket: false,
            request_timeout: Duration::from_secs(30),
            cors: None,
        }
    }

    fn on_hosts(mut route: Route, hosts: &[&str]) -> Route {
        route.hosts = hosts.iter().map(|host| HostPattern::parse(host).unwrap()).collect();
        route
    }

    fn matched(table: &RouteTable, path: &str, method: Method) -> String {
        matched_on(table, path, None, method)
    }

    fn matched_on(table: &RouteTable, path: &str, host: Option<&str>, method: Method) -> String {
        match table.lookup(path, host.map(host_name), &method) {
            RouteMatch::Found(route) => route.name.to_string(),
            RouteMatch::MethodNotAllowed(allow) => format!("405 {}", allow.to_str().unwrap()),
            RouteMatch::NotFound => "404".to_owned(),
        }
    }

    #[test]
    fn the_longest_prefix_that_allows_the_method_wins() {
        let table = RouteTable::new(vec![
            route("root", "/", &["GET"]),
            route("api", "/api", &[]),
            route("users", "/api/users", &[]),
            route("user-writes", "/api/users/admin", &["POST", "PUT"]),
            route("reports", "/reports", &["GET", "HEAD"]),
        ]);
        assert_eq!(matched(&table, "/api/users/7", Method::GET), "users");
        assert_eq!(matched(&table, "/api/usersx", Method::GET), "api");
        assert_eq!(matched(&table, "/api/users/admin", Method::POST), "user-writes");
        assert_eq!(matched(&table, "/api/users/admin", Method::GET), "users");
        assert_eq!(matched(&table, "/other", Method::GET), "root");
        assert_eq!(matched(&table, "/other", Method::DELETE), "405 GET");
        assert_eq!(matched(&table, "/reports/1", Method::POST), "405 GET, HEAD");
    }

    #[test]
    fn an_exact_host_beats_a_wildcard_which_beats_any_host_then_the_longest_prefix() {
        let table = RouteTable::new(vec![
            route("any", "/api/users", &[]),
            on_hosts(route("wild", "/api", &[]), &["*.example.com"]),
            on_hosts(route("exact", "/", &[]), &["API.example.com", "other.test"]),
            on_hosts(route("exact-get", "/api/users", &["GET"]), &["get.example.com"]),
        ]);
        let on = |host, path| matched_on(&table, path, Some(host), Method::GET);
        assert_eq!(on("api.example.com", "/api/users/1"), "exact");
        assert_eq!(
            on("Api.Example.COM:8443", "/api/users/1"),
            "exact",
            "case and port are ignored"
        );
        assert_eq!(
            on("api.example.com.", "/api/users/1"),
            "exact",
            "a trailing dot is ignored"
        );
        assert_eq!(on("www.example.com", "/api/users/1"), "wild");
        assert_eq!(
            on("www.example.com", "/other"),
            "404",
            "no route for that host and path"
        );
        assert_eq!(
            on("a.b.example.com", "/api/users/1"),
            "any",
            "a wildcard matches one label"
        );
        assert_eq!(
            on("example.com", "/api/users/1"),
            "any",
            "a wildcard does not match its own suffix"
        );
        assert_eq!(on("elsewhere.test", "/api/x"), "404");
        assert_eq!(on("get.example.com", "/api/users"), "exact-get");
        assert_eq!(
            matched_on(&table, "/api/users", Some("get.example.com"), Method::POST),
            "wild",
            "a route that does not allow the method takes no part"
        );
        assert_eq!(
            matched(&table, "/api/users", Method::GET),
            "any",
            "no host: only routes without hosts"
        );
        assert_eq!(on("[::1]:8080", "/other"), "404");
    }

    #[test]
    fn host_patterns_are_names_or_one_wildcard_label() {
        assert_eq!(
            HostPattern::parse("Example.COM."),
            Ok(HostPattern::Exact("example.com".into()))
        );
        assert_eq!(
            HostPattern::parse("*.example.com"),
            Ok(HostPattern::Wildcard(".example.com".into()))
        );
        for bad in [
            "",
            "*",
            "*.",
            "a.*.com",
            "example.com:80",
            "http://x",
            "a b",
            "a..b",
            "*example.com",
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?} is refused");
        }
        assert_eq!(host_name("[::1]:80"), "[::1]");
        assert_eq!(host_name("example.com:80"), "example.com");
        assert_eq!(host_name("example.com."), "example.com");
    }

    #[test]
    fn trace_and_connect_need_a_route_that_lists_them() {
        let table = RouteTable::new(vec![
            route("open", "/api", &[]),
            route("debug", "/api/debug", &["GET", "TRACE"]),
        ]);
        assert_eq!(
            matched(&table, "/api/x", Method::TRACE),
            "405 DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"
        );
        assert_eq!(
            matched(&table, "/api/x", Method::CONNECT),
            "405 DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"
        );
        assert_eq!(matched(&table, "/api/debug/x", Method::TRACE), "debug");
        assert_eq!(matched(&table, "/api/x", Method::GET), "open");
        assert_eq!(ALLOW_OF_AN_OPEN_ROUTE, METHODS_OF_AN_OPEN_ROUTE.join(", "));
    }

    #[test]
    fn encoded_slashes_can_be_kept_as_part_of_their_segment() {
        let cases: &[(&str, Result<&str, InvalidPath>)] = &[
            ("/pkg/@scope%2Fname", Ok("/pkg/@scope%2Fname")),
            ("/pkg/a%2f..%2Fb", Ok("/pkg/a%2f..%2Fb")),
            ("/pkg/a%2F/../b", Ok("/pkg/b")),
            ("/pkg//%2F", Ok("/pkg/%2F")),
            ("/pkg/%5C", Err(InvalidPath::EncodedSeparator)),
            ("/pkg/%00", Err(InvalidPath::ControlCharacter)),
        ];
        for (raw, expected) in cases {
            let got = normalize_path_keeping_encoded_slashes(raw);
            assert_eq!(got.as_deref().map_err(|e| *e), *expected, "normalizing {raw:?}");
        }
    }

    #[test]
    fn unmatched_paths_are_not_found() {
        let table = RouteTable::new(vec![route("users", "/api/users", &[])]);
        assert_eq!(matched(&table, "/api", Method::GET), "404");
        assert_eq!(matched(&table, "/Api/users", Method::GET), "404");
    }

    #[test]
    fn stripping_keeps_an_absolute_path() {
        assert_eq!(strip_route_prefix("/api/users/1", "/api/users"), "/1");
        assert_eq!(strip_route_prefix("/api/users", "/api/users"), "/");
        assert_eq!(strip_route_prefix("/api/x", "/api/"), "/x");
        assert_eq!(strip_route_prefix("/x", "/"), "/x");
    }
}
