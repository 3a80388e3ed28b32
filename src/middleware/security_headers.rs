//! helmet's default security headers (SPEC §3) on every response the gateway
//! sends: proxied ones, its own errors and endpoints. An upstream's own header
//! of the same name wins. The gateway never sends `Server` or `X-Powered-By`.

use std::future::{ready, Ready};

use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::Error;
use futures_util::future::LocalBoxFuture;

const X_POWERED_BY: HeaderName = HeaderName::from_static("x-powered-by");

/// Names and values, as helmet sends them by default.
const SECURITY_HEADERS: [(&str, &str); 12] = [
    (
        "content-security-policy",
        "default-src 'self';base-uri 'self';font-src 'self' https: data:;form-action 'self';frame-ancestors 'self';img-src 'self' data:;object-src 'none';script-src 'self';script-src-attr 'none';style-src 'self' https: 'unsafe-inline';upgrade-insecure-requests",
    ),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
    ("origin-agent-cluster", "?1"),
    ("referrer-policy", "no-referrer"),
    ("strict-transport-security", "max-age=31536000; includeSubDomains"),
    ("x-content-type-options", "nosniff"),
    ("x-dns-prefetch-control", "off"),
    ("x-download-options", "noopen"),
    ("x-frame-options", "SAMEORIGIN"),
    ("x-permitted-cross-domain-policies", "none"),
    ("x-xss-protection", "0"),
];

/// The headers as typed values, built once.
fn security_headers() -> Vec<(HeaderName, HeaderValue)> {
    SECURITY_HEADERS
        .iter()
        .map(|(name, value)| (HeaderName::from_static(name), HeaderValue::from_static(value)))
        .collect()
}

pub struct SecurityHeaders;

impl<S, B> Transform<S, ServiceRequest> for SecurityHeaders
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<B>;
    type Error = Error;
    type Transform = SecurityHeadersService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(SecurityHeadersService {
            service,
            headers: security_headers().into(),
        }))
    }
}

pub struct SecurityHeadersService<S> {
    service: S,
    headers: std::rc::Rc<[(HeaderName, HeaderValue)]>,
}

impl<S, B> Service<ServiceRequest> for SecurityHeadersService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<B>;
    type Error = Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    actix_web::dev::forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let response = self.service.call(req);
        let headers = self.headers.clone();
        Box::pin(async move {
            let mut response = response.await?;
            let map = response.headers_mut();
            // One pass over the response's few names instead of a hashed
            // lookup per security header: upstreams rarely set any of them.
            let mut overlaps = false;
            let mut identifies_server = false;
            for name in map.keys() {
                overlaps |= headers.iter().any(|(own, _)| own == name);
                identifies_server |= name == header::SERVER || name == X_POWERED_BY;
            }
            map.reserve(headers.len());
            for (name, value) in headers.iter() {
                if !overlaps || !map.contains_key(name) {
                    map.insert(name.clone(), value.clone());
                }
            }
            if identifies_server {
                map.remove(header::SERVER);
                map.remove(X_POWERED_BY);
            }
            Ok(response)
        })
    }
}
