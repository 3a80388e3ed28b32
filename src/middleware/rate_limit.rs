//! Steps 4 and 5b of the pipeline: rate limits, counted at two points.
//!
//! - [`Stage::Address`], before auth: the global policy and the route's, those
//!   keyed by `ip` (so rejected tokens count, and token brute force is
//!   limited). Unmatched requests count against the global policy here,
//!   before their 404/405.
//! - [`Stage::User`], after auth: those keyed by `user` (the JWT `sub`, or the
//!   client address when there is no token).
//!
//! The policies of one point are decided in one round trip, all or nothing.
//! The address stage, being outer, writes the `RateLimit-*` headers of the
//! most restrictive policy seen at either point onto the response.

use std::net::IpAddr;
use std::rc::Rc;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use actix_web::{Error, HttpMessage};
use futures_util::future::{Either, LocalBoxFuture};

use crate::auth::Identity;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::middleware::route_match::{Routed, Target};
use crate::middleware::{passthrough, Passthrough};
use crate::ratelimit::PolicyState;
use crate::settings::PolicyKey;
use crate::worker::Snapshot;

const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Address,
    User,
}

/// The most restrictive policy state of the request so far.
#[derive(Debug, Clone, Copy)]
struct LimitState(PolicyState);

/// The client address of SPEC §4, for the rate-limit key.
pub fn client_address(req: &ServiceRequest, gateway: &Gateway) -> Option<IpAddr> {
    let peer = req.peer_addr()?.ip();
    let forwarded = req
        .headers()
        .get_all(X_FORWARDED_FOR)
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|entry| forwarded_address(entry.trim()))
        .collect::<Vec<_>>();
    Some(gateway.client_address(peer, forwarded.into_iter()))
}

/// One `X-Forwarded-For` entry: an address, or an address with a port as some
/// load balancers write it (`203.0.113.7:51234`, `[2001:db8::1]:443`).
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|addr| addr.ip()))
}

/// The policies this stage counts for this request (indices into the
/// request's snapshot's policies).
fn policies_for(routed: &Routed, stage: Stage) -> Vec<usize> {
    let key = match stage {
        Stage::Address => PolicyKey::Ip,
        Stage::User => PolicyKey::User,
    };
    let gateway = &routed.snapshot.gateway;
    match &routed.target {
        Target::Route(route) => gateway.policies_for(route.rate_limit, key),
        // A preflight is counted by address, and answered before auth.
        Target::Preflight(route) => match stage {
            Stage::Address => gateway.policies_for(route.rate_limit, key),
            Stage::User => Vec::new(),
        },
        Target::NotFound | Target::MethodNotAllowed(_) => gateway.policies_for(None, key),
        Target::Health | Target::Metrics => Vec::new(),
    }
}

fn client_key(req: &ServiceRequest, gateway: &Gateway, stage: Stage) -> String {
    if stage == Stage::User {
        if let Some(identity) = req.extensions().get::<Identity>() {
            return identity.subject.clone();
        }
    }
    client_address(req, gateway).map_or_else(|| "unknown".to_owned(), |ip| ip.to_string())
}

fn set_headers(headers: &mut HeaderMap, state: PolicyState, gateway: &Gateway) {
    headers.insert(RATELIMIT_POLICY, gateway.policies[state.policy].header.clone());
    headers.insert(RATELIMIT_LIMIT, HeaderValue::from(state.limit));
    headers.insert(RATELIMIT_REMAINING, HeaderValue::from(state.remaining));
    headers.insert(RATELIMIT_RESET, HeaderValue::from(state.reset_s));
}

/// One stage's limits; the policies and the limiter come with each
/// request's snapshot. Built by [`crate::middleware::access`].
pub struct RateLimitService<S> {
    service: Rc<S>,
    stage: Stage,
}

impl<S> RateLimitService<S> {
    pub fn new(service: S, stage: Stage) -> Self {
        Self {
            service: Rc::new(service),
            stage,
        }
    }
}

impl<S, B> Service<ServiceRequest> for RateLimitService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Future = Either<Passthrough<S::Future, B>, LocalBoxFuture<'static, Result<Self::Response, Self::Error>>>;

    actix_web::dev::forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let stage = self.stage;
        let counted = req.extensions().get::<Routed>().and_then(|routed| {
            let policies = policies_for(routed, stage);
            // The address stage writes the headers for what the user stage counts.
            let counted_later = stage == Stage::Address && !policies_for(routed, Stage::User).is_empty();
            (!policies.is_empty() || counted_later).then(|| (routed.snapshot.clone(), policies))
        });
        let Some((snapshot, policies)) = counted else {
            return Either::Left(passthrough(self.service.call(req)));
        };
        let service = self.service.clone();
        let key = (!policies.is_empty()).then(|| client_key(&req, &snapshot.gateway, stage));
        Either::Right(Box::pin(async move {
            let Snapshot { gateway, limiter, .. } = &*snapshot;
            let verdict = match &key {
                None => None,
                Some(key) => match limiter.check(key, &gateway.policies, &policies).await {
                    Ok(verdict) => verdict,
                    Err(error) => return Ok(req.error_response(error).map_into_right_body()),
                },
            };
            if let Some(verdict) = &verdict {
                let seen = req.extensions().get::<LimitState>().copied();
                if let Some(state) = verdict.most_restrictive() {
                    let merged = seen.map_or(state, |LimitState(earlier)| earlier.more_restrictive(state));
                    req.extensions_mut().insert(LimitState(merged));
                }
                if let (false, Some(refusing)) = (verdict.admitted, verdict.refusing()) {
                    let policy = &gateway.policies[refusing.policy];
                    crate::metrics::rate_limited(&policy.name);
                    let error = GatewayError::RateLimited {
                        policy: policy.name.to_string(),
                        message: policy.message.clone(),
                        retry_after: refusing.reset_s,
                    };
                    let mut response = req.error_response(error);
                    if stage == Stage::Address {
                        set_headers(response.headers_mut(), refusing, gateway);
                    }
                    return Ok(response.map_into_right_body());
                }
            }
            let mut response = service.call(req).await?;
            if stage == Stage::Address {
                let state = response.request().extensions().get::<LimitState>().copied();
                if let Some(LimitState(state)) = state {
                    set_headers(response.headers_mut(), state, gateway);
                }
            }
            Ok(response.map_into_left_body())
        }))
    }
}
