//! Steps 4 to 5b of the pipeline as one layer: the address-keyed limits
//! ([`rate_limit`], [`Stage::Address`]), the token check ([`auth`]) and the
//! user-keyed limits ([`Stage::User`]), in that order, for the requests they
//! concern.
//!
//! A request that no policy counts and no token guards (a public route
//! without limits, `/health`, `/metrics`) goes straight to the handler:
//! through the three layers it would only pass, each with its own future,
//! body wrapper and extension lookup, it cost 2.7 % more CPU (an
//! interleaved A/B, docs/performance.md). Every other request goes through all three, exactly
//! as when they were stacked one by one.

use std::future::{ready, Ready};
use std::rc::Rc;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::{Error, HttpMessage};
use futures_util::future::{Either, MapOk, TryFutureExt};

use crate::middleware::auth::AuthenticationService;
use crate::middleware::rate_limit::{RateLimitService, Stage};
use crate::middleware::route_match::{Routed, Target};

/// The three stages, outermost first, around the handler.
type Checked<S> = RateLimitService<AuthenticationService<RateLimitService<Rc<S>>>>;

/// The body of a response from either path.
type AccessBody<B> = EitherBody<EitherBody<EitherBody<B>>>;

/// The handler's response, its body typed as if it had passed the stages.
type Unchecked<F, B> = MapOk<F, fn(ServiceResponse<B>) -> ServiceResponse<AccessBody<B>>>;

fn as_checked<B>(response: ServiceResponse<B>) -> ServiceResponse<AccessBody<B>> {
    response.map_body(|_, body| EitherBody::left(EitherBody::left(EitherBody::left(body))))
}

/// Whether any stage may act on the request. Conservative: a request that
/// some policy might count, or whose route asks for a token, goes through
/// the stages, which decide for themselves.
fn concerns(routed: &Routed) -> bool {
    let gateway = &routed.snapshot.gateway;
    let limited = |route_policy: Option<usize>| gateway.global_policy.is_some() || route_policy.is_some();
    match &routed.target {
        Target::Route(route) | Target::Preflight(route) => route.auth || limited(route.rate_limit),
        Target::NotFound | Target::MethodNotAllowed(_) => limited(None),
        Target::Health | Target::Metrics => false,
    }
}

pub struct Access;

impl<S, B> Transform<S, ServiceRequest> for Access
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<AccessBody<B>>;
    type Error = Error;
    type Transform = AccessService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        let handler = Rc::new(service);
        let user = RateLimitService::new(handler.clone(), Stage::User);
        let checked = RateLimitService::new(AuthenticationService::new(user), Stage::Address);
        ready(Ok(AccessService { handler, checked }))
    }
}

pub struct AccessService<S> {
    handler: Rc<S>,
    checked: Checked<S>,
}

impl<S, B> Service<ServiceRequest> for AccessService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<AccessBody<B>>;
    type Error = Error;
    type Future = Either<Unchecked<S::Future, B>, <Checked<S> as Service<ServiceRequest>>::Future>;

    actix_web::dev::forward_ready!(handler);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let concerned = req.extensions().get::<Routed>().is_none_or(concerns);
        if concerned {
            Either::Right(self.checked.call(req))
        } else {
            Either::Left(self.handler.call(req).map_ok(as_checked as fn(_) -> _))
        }
    }
}
