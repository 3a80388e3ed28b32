//! Integration tests: real upstreams, the real gateway, real sockets.

mod helpers;
mod routing;
