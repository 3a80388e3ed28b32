//! The request pipeline's middleware, outermost first (SPEC §3):
//!
//! 0. [`connection_watch`]: counts requests in flight per connection, so a
//!    keep-alive connection stalled in a later request head can be closed.
//! 1. [`security_headers`]: helmet's headers on every response.
//! 2. [`request_id`]: keeps or mints `X-Request-Id`; turns any error that
//!    escaped the inner layers into a response, so nothing leaves bare.
//! 3. `tracing_actix_web::TracingLogger` with [`crate::telemetry::GatewayRootSpan`].
//! 4. [`body_check`]: 400 as soon as a chunked request body turns out malformed.
//! 5. [`route_match`]: head size, path normalization and route lookup;
//!    the routed request's response gets its route's CORS headers
//!    ([`cors`]).
//! 6. [`access`], one layer for the three stages below, which a request no
//!    policy counts and no token guards skips:
//!    - [`rate_limit`] (address stage): policies keyed by client address;
//!    - [`auth`]: bearer token and roles, for routes that ask for them;
//!    - [`rate_limit`] (user stage): policies keyed by the JWT `sub`.
//!
//! The dispatch handler in [`crate::worker`] answers 404/405, CORS
//! preflights, the gateway's own endpoints, or forwards through
//! [`crate::proxy`].

pub mod access;
pub mod auth;
pub mod body_check;
pub mod connection_watch;
pub mod cors;
pub mod rate_limit;
pub mod request_id;
pub mod route_match;
pub mod security_headers;

use actix_web::body::EitherBody;
use actix_web::dev::ServiceResponse;
use futures_util::future::{MapOk, TryFutureExt};

/// The inner service's response passed on unchanged (as the left body of an
/// `EitherBody`) without boxing a future: the common path of the layers that
/// only sometimes answer themselves.
pub type Passthrough<F, B> = MapOk<F, fn(ServiceResponse<B>) -> ServiceResponse<EitherBody<B>>>;

pub fn passthrough<F, B>(response: F) -> Passthrough<F, B>
where
    F: futures_util::TryFuture<Ok = ServiceResponse<B>>,
{
    response.map_ok(ServiceResponse::map_into_left_body as fn(_) -> _)
}
