//! Integration tests: real upstreams, the real gateway, real sockets.

mod auth;
mod balancing;
mod client_requests;
mod cors;
mod forwarding;
mod framing;
mod hardening;
mod helpers;
mod jwks;
mod metrics;
mod process;
mod rate_limits;
mod redis_nodes;
mod reload;
mod routing;
mod scale_out;
mod tls;
mod upstream_responses;
mod websocket;
