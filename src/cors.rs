//! A route's CORS policy (SPEC §10), compiled from `[routes.<name>.cors]`:
//! what a preflight is answered, and which headers the route's other
//! responses carry. Pure functions over headers; the middleware that applies
//! them is [`crate::middleware::cors`].

use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::Method;

use crate::routing::parse_method;
use crate::settings::CorsSettings;

/// Methods allowed when neither `allow_methods` nor the route's `methods`
/// name any: what a route without `methods` accepts.
const OPEN_ROUTE_METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

/// One route's compiled CORS settings.
#[derive(Debug, Clone)]
pub struct CorsPolicy {
    origins: AllowedOrigins,
    methods: Vec<Method>,
    /// `Access-Control-Allow-Methods`, prebuilt.
    methods_value: HeaderValue,
    headers: AllowedHeaders,
    expose_headers: Option<HeaderValue>,
    credentials: bool,
    max_age: Option<HeaderValue>,
}

#[derive(Debug, Clone)]
enum AllowedOrigins {
    Any,
    /// Lower-case, as browsers serialize origins.
    Listed(Vec<String>),
}

#[derive(Debug, Clone)]
enum AllowedHeaders {
    Any,
    /// Lower-case names.
    Listed(Vec<String>),
}

/// What the configuration says is wrong, as (field, reason) pairs.
pub fn problems(settings: &CorsSettings) -> Vec<(&'static str, String)> {
    let mut found = Vec::new();
    let wildcard = settings.allow_origins.iter().any(|origin| origin == "*");
    if settings.allow_origins.is_empty() {
        found.push(("allow_origins", "must list at least one origin, or \"*\"".to_owned()));
    }
    if wildcard && settings.allow_origins.len() > 1 {
        found.push(("allow_origins", "\"*\" must be the only entry".to_owned()));
    }
    for origin in settings.allow_origins.iter().filter(|origin| *origin != "*") {
        if !is_origin(origin) {
            found.push((
                "allow_origins",
                format!("{origin:?} is not an origin (scheme://host[:port], no path)"),
            ));
        }
    }
    if wildcard && settings.allow_credentials {
        found.push((
            "allow_credentials",
            "cannot be true with allow_origins = [\"*\"] (browsers refuse it)".to_owned(),
        ));
    }
    for method in &settings.allow_methods {
        if parse_method(method).is_none() {
            found.push(("allow_methods", format!("{method:?} is not an HTTP method")));
        }
    }
    for name in &settings.allow_headers {
        if name != "*" && HeaderName::try_from(name.as_str()).is_err() {
            found.push(("allow_headers", format!("{name:?} is not a header name")));
        }
    }
    for name in &settings.expose_headers {
        if HeaderName::try_from(name.as_str()).is_err() {
            found.push(("expose_headers", format!("{name:?} is not a header name")));
        }
    }
    found
}

/// `scheme://host[:port]` and nothing more, as the `Origin` header carries it.
fn is_origin(text: &str) -> bool {
    let Some((scheme, rest)) = text.split_once("://") else {
        return false;
    };
    !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        && !rest.is_empty()
        && !rest.contains(['/', '?', '#', '@', ' '])
}

fn joined(items: impl IntoIterator<Item = impl AsRef<str>>) -> Option<HeaderValue> {
    let text = items
        .into_iter()
        .map(|item| item.as_ref().to_owned())
        .collect::<Vec<_>>()
        .join(", ");
    (!text.is_empty()).then(|| HeaderValue::from_str(&text).ok()).flatten()
}

impl CorsPolicy {
    /// `route_methods` is the route's `methods` (`None` for an open route).
    /// The settings have passed [`problems`].
    pub fn compile(settings: &CorsSettings, route_methods: Option<&[Method]>) -> Result<Self, String> {
        if let Some((field, reason)) = problems(settings).into_iter().next() {
            return Err(format!("cors.{field}: {reason}"));
        }
        let origins = if settings.allow_origins.iter().any(|origin| origin == "*") {
            AllowedOrigins::Any
        } else {
            AllowedOrigins::Listed(settings.allow_origins.iter().map(|o| o.to_ascii_lowercase()).collect())
        };
        let methods: Vec<Method> = if !settings.allow_methods.is_empty() {
            settings.allow_methods.iter().filter_map(|m| parse_method(m)).collect()
        } else {
            route_methods.map_or_else(|| OPEN_ROUTE_METHODS.to_vec(), <[Method]>::to_vec)
        };
        let headers = if settings.allow_headers.iter().any(|name| name == "*") {
            AllowedHeaders::Any
        } else {
            AllowedHeaders::Listed(settings.allow_headers.iter().map(|n| n.to_ascii_lowercase()).collect())
        };
        Ok(Self {
            origins,
            methods_value: joined(methods.iter().map(Method::as_str)).unwrap_or(HeaderValue::from_static("")),
            methods,
            headers,
            expose_headers: joined(&settings.expose_headers),
            credentials: settings.allow_credentials,
            max_age: (settings.max_age_s > 0).then(|| HeaderValue::from(settings.max_age_s)),
        })
    }

    /// The `Access-Control-Allow-Origin` value for a request from `origin`,
    /// or `None` when that origin is not allowed.
    fn allow_origin(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        match &self.origins {
            AllowedOrigins::Any => Some(HeaderValue::from_static("*")),
            AllowedOrigins::Listed(allowed) => {
                let text = origin.to_str().ok()?;
                allowed
                    .iter()
                    .any(|allowed| allowed.eq_ignore_ascii_case(text))
                    .then(|| origin.clone())
            }
        }
    }

    /// The 204 answer's headers to a preflight: the `Access-Control-Allow-*`
    /// set when the origin, the method and every requested header are
    /// allowed, else `Vary: Origin` alone (the browser then blocks the call).
    pub fn preflight(&self, request: &HeaderMap, response: &mut HeaderMap) {
        append_vary_origin(response);
        let Some(origin) = request.get(header::ORIGIN).and_then(|origin| self.allow_origin(origin)) else {
            return;
        };
        let method_allowed = request
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|value| Method::from_bytes(value.as_bytes()).ok())
            .is_some_and(|method| self.methods.contains(&method));
        let requested: Vec<String> = request
            .get_all(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(|name| name.trim().to_ascii_lowercase())
            .filter(|name| !name.is_empty())
            .collect();
        let headers_allowed = match &self.headers {
            AllowedHeaders::Any => requested.iter().all(|name| HeaderName::try_from(name.as_str()).is_ok()),
            AllowedHeaders::Listed(allowed) => requested.iter().all(|name| allowed.contains(name)),
        };
        if !method_allowed || !headers_allowed {
            return;
        }
        response.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        response.insert(header::ACCESS_CONTROL_ALLOW_METHODS, self.methods_value.clone());
        if let Some(value) = joined(&requested) {
            response.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, value);
        }
        if let Some(max_age) = &self.max_age {
            response.insert(header::ACCESS_CONTROL_MAX_AGE, max_age.clone());
        }
        if self.credentials {
            response.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }

    /// A response of the route other than a preflight's 204: any CORS
    /// header the upstream sent is dropped (the route's policy is the one
    /// browsers see), and a request from an allowed origin gets the
    /// route's.
    pub fn decorate(&self, request: &HeaderMap, response: &mut HeaderMap) {
        let upstream_cors: Vec<HeaderName> = response
            .keys()
            .filter(|name| name.as_str().starts_with("access-control-"))
            .cloned()
            .collect();
        for name in upstream_cors {
            response.remove(name);
        }
        append_vary_origin(response);
        let Some(origin) = request.get(header::ORIGIN).and_then(|origin| self.allow_origin(origin)) else {
            return;
        };
        response.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if self.credentials {
            response.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(expose) = &self.expose_headers {
            response.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
        }
    }
}

/// Adds `Origin` to `Vary` unless it is there (or `Vary: *`), keeping the
/// upstream's other entries.
fn append_vary_origin(response: &mut HeaderMap) {
    let listed = response
        .get_all(header::VARY)
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| matches!(token.trim(), "*") || token.trim().eq_ignore_ascii_case("origin"));
    if !listed {
        response.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

/// A CORS preflight: `OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`.
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    *method == Method::OPTIONS
        && headers.contains_key(header::ORIGIN)
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(origins: &[&str], credentials: bool) -> CorsSettings {
        CorsSettings {
            allow_origins: origins.iter().map(|o| o.to_string()).collect(),
            allow_methods: vec!["GET".into(), "POST".into()],
            allow_headers: vec!["Authorization".into(), "Content-Type".into()],
            expose_headers: vec!["X-Request-Id".into()],
            allow_credentials: credentials,
            max_age_s: 600,
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::try_from(*name).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn get<'a>(map: &'a HeaderMap, name: &str) -> Option<&'a str> {
        map.get(name).map(|value| value.to_str().unwrap())
    }

    #[test]
    fn a_wildcard_origin_with_credentials_is_refused() {
        let found = problems(&settings(&["*"], true));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, "allow_credentials");
        assert!(problems(&settings(&["*"], false)).is_empty());
        assert!(problems(&settings(&["https://app.example.com", "http://localhost:3000"], true)).is_empty());
        for bad in ["app.example.com", "https://app.example.com/", "https://a.example/x", ""] {
            assert!(!problems(&settings(&[bad], false)).is_empty(), "{bad:?} is refused");
        }
    }

    #[test]
    fn an_allowed_preflight_gets_the_allow_headers_and_a_refused_one_none() {
        let policy = CorsPolicy::compile(&settings(&["https://app.example.com"], true), None).unwrap();
        let mut response = HeaderMap::new();
        policy.preflight(
            &headers(&[
                ("origin", "https://app.example.com"),
                ("access-control-request-method", "POST"),
                ("access-control-request-headers", "content-type, Authorization"),
            ]),
            &mut response,
        );
        assert_eq!(
            get(&response, "access-control-allow-origin"),
            Some("https://app.example.com")
        );
        assert_eq!(get(&response, "access-control-allow-methods"), Some("GET, POST"));
        assert_eq!(
            get(&response, "access-control-allow-headers"),
            Some("content-type, authorization")
        );
        assert_eq!(get(&response, "access-control-max-age"), Some("600"));
        assert_eq!(get(&response, "access-control-allow-credentials"), Some("true"));
        assert_eq!(get(&response, "vary"), Some("Origin"));

        for request in [
            headers(&[
                ("origin", "https://evil.example"),
                ("access-control-request-method", "GET"),
            ]),
            headers(&[
                ("origin", "https://app.example.com"),
                ("access-control-request-method", "DELETE"),
            ]),
            headers(&[
                ("origin", "https://app.example.com"),
                ("access-control-request-method", "GET"),
                ("access-control-request-headers", "x-secret"),
            ]),
        ] {
            let mut response = HeaderMap::new();
            policy.preflight(&request, &mut response);
            assert!(
                !response.keys().any(|name| name.as_str().starts_with("access-control-")),
                "{request:?} gets no allow headers"
            );
            assert_eq!(get(&response, "vary"), Some("Origin"));
        }
    }

    #[test]
    fn responses_get_the_route_s_headers_in_place_of_the_upstream_s() {
        let policy = CorsPolicy::compile(&settings(&["https://app.example.com"], false), None).unwrap();
        let mut response = headers(&[
            ("access-control-allow-origin", "*"),
            ("access-control-allow-credentials", "true"),
            ("vary", "Accept-Encoding"),
        ]);
        policy.decorate(&headers(&[("origin", "https://app.example.com")]), &mut response);
        assert_eq!(
            get(&response, "access-control-allow-origin"),
            Some("https://app.example.com")
        );
        assert_eq!(get(&response, "access-control-allow-credentials"), None);
        assert_eq!(get(&response, "access-control-expose-headers"), Some("X-Request-Id"));
        let vary: Vec<_> = response.get_all("vary").map(|v| v.to_str().unwrap()).collect();
        assert_eq!(vary, ["Accept-Encoding", "Origin"]);

        let mut response = headers(&[("access-control-allow-origin", "*")]);
        policy.decorate(&headers(&[("origin", "https://evil.example")]), &mut response);
        assert_eq!(get(&response, "access-control-allow-origin"), None);
    }

    #[test]
    fn any_origin_without_credentials_is_answered_with_a_star() {
        let policy = CorsPolicy::compile(&settings(&["*"], false), None).unwrap();
        let mut response = HeaderMap::new();
        policy.decorate(&headers(&[("origin", "https://anyone.example")]), &mut response);
        assert_eq!(get(&response, "access-control-allow-origin"), Some("*"));
    }
}
