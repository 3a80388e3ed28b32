//! CORS on the routes that have a policy (SPEC §10): every response of such
//! a route, the gateway's own 401/403/429 included, gets the route's CORS
//! headers in place of the upstream's. The route matcher wraps the rest of
//! the pipeline in [`WithCors`], so the address-keyed limits' 429s are
//! covered too.
//! Preflights are told apart by the route matcher ([`Target::Preflight`]),
//! pass the address-keyed limits, skip auth, and are answered by the dispatch
//! handler with [`preflight_response`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use actix_web::dev::ServiceResponse;
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

pin_project_lite::pin_project! {
    /// The inner response, with the CORS headers of `route` when it has a
    /// policy. The route matcher wraps every routed request in it, so
    /// routes without a policy pay one `Option` check and nothing else.
    pub struct WithCors<F> {
        #[pin]
        response: F,
        route: Option<Arc<Route>>,
    }
}

impl<F> WithCors<F> {
    /// `route`: the route the request matched (or a preflight asks about),
    /// when it has a CORS policy.
    pub fn new(response: F, route: Option<Arc<Route>>) -> Self {
        Self { response, route }
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
        if let Some(policy) = this.route.as_ref().and_then(|route| route.cors.as_ref()) {
            let request = response.request().clone();
            let answered_preflight = response.status() == StatusCode::NO_CONTENT
                && matches!(
                    request.extensions().get::<Routed>().map(|routed| &routed.target),
                    Some(Target::Preflight(_))
                );
            if !answered_preflight {
                policy.decorate(request.headers(), response.headers_mut());
            }
        }
        Poll::Ready(Ok(response))
    }
}
