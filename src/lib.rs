//! gatehouse: an API gateway on actix-web.
//!
//! A request travels through these modules, in order:
//!
//! - [`middleware`]: security headers, request id, logging span, then
//!   [`middleware::route_match`], which normalizes the path ([`routing`]) and
//!   picks the route, and [`middleware::auth`], which checks bearer tokens
//!   with [`auth`]; [`middleware::cors`] answers preflights and adds a
//!   route's CORS headers ([`cors`]).
//! - [`worker`]'s dispatch handler answers the gateway's own [`endpoints`]
//!   or hands the request to [`proxy`], which asks this worker's
//!   [`actors::balancer`] for an instance and forwards with awc, or to
//!   [`websocket`], which tunnels WebSocket upgrades.
//! - [`startup`] binds, starts the actors and the workers; [`reload`] puts
//!   a new configuration in force on SIGHUP or a file change.
//! - [`error`] maps every refusal to the spec's JSON bodies.
//!
//! State that changes while running lives in [`actors`]: the registry owns
//! instance health, the health checker probes, the balancers rotate.
//! [`jwks`] parses an identity provider's key set and picks a token's key
//! (not yet fetched by the gateway: SPEC §11 is being built).
//! [`settings`] loads the layered configuration; [`gateway`] is its compiled,
//! immutable form; [`telemetry`] sets up logs; [`cli`] is the command line.

pub mod actors;
pub mod auth;
pub mod cli;
pub mod cors;
pub mod endpoints;
pub mod error;
pub mod gateway;
pub mod jwks;
pub mod metrics;
pub mod middleware;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod routing;
pub mod settings;
pub mod startup;
pub mod telemetry;
pub mod tls;
pub mod websocket;
pub mod worker;
