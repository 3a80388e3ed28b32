//! The request pipeline's middleware, outermost first (SPEC §3):
//!
//! 1. [`security_headers`]: helmet's headers on every response.
//! 2. [`request_id`]: keeps or mints `X-Request-Id`; turns any error that
//!    escaped the inner layers into a response, so nothing leaves bare.
//! 3. `tracing_actix_web::TracingLogger` with [`crate::telemetry::GatewayRootSpan`].
//! 4. [`route_match`]: head size, path normalization and route lookup.
//! 5. [`rate_limit`] (address stage): policies keyed by client address.
//! 6. [`auth`]: bearer token and roles, for routes that ask for them.
//! 7. [`rate_limit`] (user stage): policies keyed by the JWT `sub`.
//!
//! The dispatch handler in [`crate::startup`] answers 404/405, the gateway's
//! own endpoints, or forwards through [`crate::proxy`].

pub mod auth;
pub mod rate_limit;
pub mod request_id;
pub mod route_match;
pub mod security_headers;
