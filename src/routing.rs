//! Path normalization and the longest-prefix route table (SPEC §3 steps 2–3).
//!
//! Both are pure functions over strings: the request path is normalized once,
//! and the normalized form is the one matched and the one forwarded, so a
//! route's view of a path and the upstream's can never disagree.

use std::borrow::Cow;
use std::sync::Arc;

use actix_web::http::header::HeaderValue;
use actix_web::http::Method;

/// Why a request path is refused with 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPath {
    #[error("path is not absolute")]
    NotAbsolute,
    #[error("malformed percent-escape")]
    MalformedEscape,
    #[error("encoded slash or backslash")]
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
    let decoded = decode_unreserved(bytes)?;
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
/// escape as sent, refusing encoded separators and control characters.
fn decode_unreserved(bytes: &[u8]) -> Result<String, InvalidPath> {
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
            b'/' | b'\\' => return Err(InvalidPath::EncodedSeparator),
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
    /// The route's own policy, an index into the gateway's policies.
    pub rate_limit: Option<usize>,
}

impl Route {
    fn allows(&self, method: &Method) -> bool {
        self.methods.as_ref().is_none_or(|methods| methods.contains(method))
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

/// Routes ordered longest prefix first, so the first allowed match wins.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    pub fn new(mut routes: Vec<Route>) -> Self {
        routes.sort_by(|a, b| b.prefix.len().cmp(&a.prefix.len()).then_with(|| a.name.cmp(&b.name)));
        Self {
            routes: routes.into_iter().map(Arc::new).collect(),
        }
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// Longest matching prefix among the routes that allow `method`.
    pub fn lookup(&self, path: &str, method: &Method) -> RouteMatch<'_> {
        let mut path_matched = false;
        for route in &self.routes {
            if prefix_matches(path, &route.prefix) {
                if route.allows(method) {
                    return RouteMatch::Found(route);
                }
                path_matched = true;
            }
        }
        if path_matched {
            RouteMatch::MethodNotAllowed(self.allowed_methods(path))
        } else {
            RouteMatch::NotFound
        }
    }

    fn allowed_methods(&self, path: &str) -> HeaderValue {
        let mut allowed: Vec<&str> = self
            .routes
            .iter()
            .filter(|route| prefix_matches(path, &route.prefix))
            .flat_map(|route| route.methods.iter().flatten().map(Method::as_str))
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
            ("/api/users%2F7", Err(InvalidPath::EncodedSeparator)),
            ("/api/users%2f7", Err(InvalidPath::EncodedSeparator)),
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
            rate_limit: None,
        }
    }

    fn matched(table: &RouteTable, path: &str, method: Method) -> String {
        match table.lookup(path, &method) {
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
