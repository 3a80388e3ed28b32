//! helmet's default security headers (SPEC §3) on every response the gateway
//! sends: proxied ones, its own errors and endpoints, except on routes with
//! `security_headers = false`. An upstream's own header of the same name
//! wins. The gateway never sends `Server` or `X-Powered-By`.

use std::future::{ready, Future, Ready};
use std::pin::Pin;
use std::task::{Context, Poll};

use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::{Error, HttpMessage};

use crate::middleware::route_match::Routed;

const X_POWERED_BY: HeaderName = HeaderName::from_static("x-powered-by");

/// Names and values, as helmet sends them by default.
static SECURITY_HEADERS: [(HeaderName, HeaderValue); 12] = [
    (
        HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static("default-src 'self';base-uri 'self';font-src 'self' https: data:;form-action 'self';frame-ancestors 'self';img-src 'self' data:;object-src 'none';script-src 'self';script-src-attr 'none';style-src 'self' https: 'unsafe-inline';upgrade-insecure-requests"),
    ),
    (HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin")),
    (HeaderName::from_static("cross-origin-resource-policy"), HeaderValue::from_static("same-origin")),
    (HeaderName::from_static("origin-agent-cluster"), HeaderValue::from_static("?1")),
    (HeaderName::from_static("referrer-policy"), HeaderValue::from_static("no-referrer")),
    (
        HeaderName::from_static("strict-transport-security"),
        HeaderValue::from_static("max-age=31536000; includeSubDomains"),
    ),
    (HeaderName::from_static("x-content-type-options"), HeaderValue::from_static("nosniff")),
    (HeaderName::from_static("x-dns-prefetch-control"), HeaderValue::from_static("off")),
    (HeaderName::from_static("x-download-options"), HeaderValue::from_static("noopen")),
    (HeaderName::from_static("x-frame-options"), HeaderValue::from_static("SAMEORIGIN")),
    (HeaderName::from_static("x-permitted-cross-domain-policies"), HeaderValue::from_static("none")),
    (HeaderName::from_static("x-xss-protection"), HeaderValue::from_static("0")),
];

/// Adds the security headers the response does not set itself (unless
/// `helmet` is false) and drops the headers that name the server software.
fn secure(map: &mut HeaderMap, helmet: bool) {
    // One pass over the response's few names instead of a hashed lookup per
    // security header: upstreams rarely set any of them.
    let mut overlaps = false;
    let mut identifies_server = false;
    for name in map.keys() {
        overlaps |= SECURITY_HEADERS.iter().any(|(own, _)| own == name);
        identifies_server |= name == header::SERVER || name == X_POWERED_BY;
    }
    if helmet {
        map.reserve(SECURITY_HEADERS.len());
        for (name, value) in &SECURITY_HEADERS {
            if !overlaps || !map.contains_key(name) {
                map.insert(name.clone(), value.clone());
            }
        }
    }
    if identifies_server {
        map.remove(header::SERVER);
        map.remove(X_POWERED_BY);
    }
}

/// Adds the headers to every response unless its request was routed, on the
/// configuration it used, to a route with `security_headers = false`.
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
        ready(Ok(SecurityHeadersService { service }))
    }
}

pub struct SecurityHeadersService<S> {
    service: S,
}

impl<S, B> Service<ServiceRequest> for SecurityHeadersService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<B>;
    type Error = Error;
    type Future = Secured<S::Future>;

    actix_web::dev::forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        Secured {
            response: self.service.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner response with the security headers added (not boxed: this
    /// layer wraps every request).
    pub struct Secured<F> {
        #[pin]
        response: F,
    }
}

impl<F, B> Future for Secured<F>
where
    F: Future<Output = Result<ServiceResponse<B>, Error>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = std::task::ready!(this.response.poll(cx))?;
        let helmet = response.request().extensions().get::<Routed>().is_none_or(|routed| {
            !routed.snapshot.gateway.any_route_drops_security_headers
                || routed.matched_route().is_none_or(|route| route.security_headers)
        });
        secure(response.headers_mut(), helmet);
        Poll::Ready(Ok(response))
    }
}
