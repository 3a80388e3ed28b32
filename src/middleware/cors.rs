//! CORS on the routes that have a policy (SPEC §10): every response of such
//! a route, the gateway's own 401/403/429 included, gets the route's CORS
//! headers in place of the upstream's. This layer sits just inside the route
//! matcher, outside the address-keyed limits, so their 429s are covered too.
//! Preflights are told apart by the route matcher ([`Target::Preflight`]),
//! pass the address-keyed limits, skip auth, and are answered by the dispatch
//! handler with [`preflight_response`].

use std::future::{ready, Future, Ready};
use std::pin::Pin;
use std::task::{Context, Poll};

use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::StatusCode;
use actix_web::{Error, HttpMessage, HttpRequest, HttpResponse};

use crate::middleware::route_match::{Routed, Target};
use crate::routing::Route;

/// The 204 answer to a preflight for `route`.
pub fn preflight_response(req: &HttpRequest, route: &Route) -> HttpResponse {
    let mut response = HttpResponse::NoContent().finish();
    if let Some(policy) = &route.cors {
        policy.preflight(req.headers(), response.headers_mut());
    }
    response
}

pub struct Cors;

impl<S, B> Transform<S, ServiceRequest> for Cors
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<B>;
    type Error = Error;
    type Transform = CorsService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(CorsService { service }))
    }
}

pub struct CorsService<S> {
    service: S,
}

impl<S, B> Service<ServiceRequest> for CorsService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<B>;
    type Error = Error;
    type Future = WithCors<S::Future>;

    actix_web::dev::forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let applies = req
            .extensions()
            .get::<Routed>()
            .and_then(Routed::matched_route)
            .is_some_and(|route| route.cors.is_some());
        WithCors {
            response: self.service.call(req),
            applies,
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner response with the route's CORS headers (not boxed: this
    /// layer wraps every routed request).
    pub struct WithCors<F> {
        #[pin]
        response: F,
        applies: bool,
    }
}

impl<F, B> Future for WithCors<F>
where
    F: Future<Output = Result<ServiceResponse<B>, Error>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = std::task::ready!(this.response.poll(cx))?;
        if *this.applies {
            let request = response.request().clone();
            let extensions = request.extensions();
            let routed = extensions.get::<Routed>();
            let answered_preflight = matches!(routed.map(|routed| &routed.target), Some(Target::Preflight(_)))
                && response.status() == StatusCode::NO_CONTENT;
            if let Some(policy) = routed
                .and_then(Routed::matched_route)
                .and_then(|route| route.cors.as_ref())
            {
                if !answered_preflight {
                    policy.decorate(request.headers(), response.headers_mut());
                }
            }
        }
        Poll::Ready(Ok(response))
    }
}
