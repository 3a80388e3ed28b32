//! Step 5 of the pipeline: routes with `auth` or `roles` need a valid bearer
//! token. Missing, wrong scheme or empty: 401 with `WWW-Authenticate: Bearer`;
//! any verification failure: 403 "Invalid token"; valid but lacking every
//! required role: 403 "Insufficient permissions". On success the caller's
//! [`Identity`] goes into the request's extensions for the proxy (identity
//! headers) and the user-keyed rate limits.
//!
//! Tokens are read from the `Authorization` header only, never from the query
//! string or cookies. Each worker remembers the tokens it has verified until
//! they expire ([`crate::auth::TokenCache`], kept across reloads that keep the keys), so a client's repeated token only has its
//! `exp` and `nbf` checked again.

use std::future::{ready, Ready};
use std::rc::Rc;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::{Error, HttpMessage};
use actix_web_httpauth::headers::authorization::Bearer;
use futures_util::future::Either;

use std::sync::Arc;

use futures_util::future::LocalBoxFuture;

use crate::auth::{Identity, TokenCache, TokenError, Verifier};
use crate::error::GatewayError;
use crate::jwks::JwksKeys;
use crate::middleware::route_match::Routed;
use crate::middleware::{passthrough, Passthrough};

/// The bearer token of an `Authorization` header; the scheme is matched
/// case-insensitively (RFC 9110 §11.1), which actix-web-httpauth's own
/// parser does not do.
pub fn bearer_token(value: &HeaderValue) -> Option<Bearer> {
    let text = value.to_str().ok()?.trim();
    let (scheme, token) = text.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| Bearer::new(token.to_owned()))
}

/// What the token check says.
enum Checked {
    Done(Result<Option<Identity>, GatewayError>),
    /// The token names a `kid` the provider's set lacks: check it again once
    /// the set is fetched again (SPEC §11).
    AfterRefetch(Box<Retry>),
}

struct Retry {
    keys: Arc<JwksKeys>,
    verifier: Arc<Verifier>,
    tokens: Rc<TokenCache>,
    token: String,
    roles: Vec<String>,
}

impl Retry {
    async fn check(self) -> Result<Option<Identity>, GatewayError> {
        self.keys.refetch().await;
        let identity = self.tokens.verify(&self.verifier, &self.token).map_err(refusal)?;
        if !identity.has_any_role(&self.roles) {
            return Err(GatewayError::InsufficientPermissions);
        }
        Ok(Some(identity))
    }
}

/// A refused token as the client's error: 503 while the provider's keys
/// have never loaded, else 403.
fn refusal(error: TokenError) -> GatewayError {
    match error {
        TokenError::KeysUnavailable => GatewayError::AuthenticationUnavailable,
        other => GatewayError::InvalidToken(other.to_string()),
    }
}

fn check(req: &ServiceRequest) -> Checked {
    match authenticate(req) {
        Ok(identity) => Checked::Done(Ok(identity)),
        Err(Refused::Gateway(error)) => Checked::Done(Err(error)),
        Err(Refused::UnknownKid(reason)) => match retry_of(req) {
            Some(retry) => Checked::AfterRefetch(Box::new(retry)),
            None => Checked::Done(Err(GatewayError::InvalidToken(reason))),
        },
    }
}

/// What checking the request's token again takes, once the set is fetched
/// again (only gathered for a token whose `kid` the set lacks).
fn retry_of(req: &ServiceRequest) -> Option<Retry> {
    let extensions = req.extensions();
    let routed = extensions.get::<Routed>()?;
    let route = routed.route().filter(|route| route.auth)?;
    let verifier = routed.snapshot.verifier.clone()?;
    let keys = verifier.jwks()?.clone();
    let token = req.headers().get(header::AUTHORIZATION).and_then(bearer_token)?;
    Some(Retry {
        keys,
        verifier,
        tokens: routed.snapshot.tokens.clone(),
        token: token.token().to_string(),
        roles: route.roles.clone(),
    })
}

/// Why [`authenticate`] refused.
enum Refused {
    Gateway(GatewayError),
    /// The token's `kid` is not in the provider's set.
    UnknownKid(String),
}

impl From<GatewayError> for Refused {
    fn from(error: GatewayError) -> Self {
        Self::Gateway(error)
    }
}

/// Checks the token of a request routed to a route that needs auth, with
/// the verifier and token cache of the configuration the request uses.
fn authenticate(req: &ServiceRequest) -> Result<Option<Identity>, Refused> {
    let extensions = req.extensions();
    let Some(routed) = extensions.get::<Routed>() else {
        return Ok(None);
    };
    let Some(route) = routed.route().filter(|route| route.auth) else {
        return Ok(None);
    };
    let verifier = routed
        .snapshot
        .verifier
        .as_deref()
        .ok_or_else(|| GatewayError::Internal("a route needs auth but no keys are loaded".to_owned()))?;
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(bearer_token)
        .ok_or(GatewayError::TokenRequired)?;
    let identity = routed
        .snapshot
        .tokens
        .verify(verifier, token.token())
        .map_err(|error| match error {
            TokenError::UnknownKid(_) => Refused::UnknownKid(error.to_string()),
            other => Refused::Gateway(refusal(other)),
        })?;
    if !identity.has_any_role(&route.roles) {
        return Err(GatewayError::InsufficientPermissions.into());
    }
    Ok(Some(identity))
}

/// Step 5; the keys and the token cache come with each request's snapshot.
/// Built by [`crate::middleware::access`].
pub struct AuthenticationService<S> {
    service: Rc<S>,
}

impl<S> AuthenticationService<S> {
    pub fn new(service: S) -> Self {
        Self {
            service: Rc::new(service),
        }
    }
}

impl<S, B> Service<ServiceRequest> for AuthenticationService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Future = Either<
        Passthrough<S::Future, B>,
        Either<
            Ready<Result<Self::Response, Self::Error>>,
            LocalBoxFuture<'static, Result<Self::Response, Self::Error>>,
        >,
    >;

    actix_web::dev::forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        match check(&req) {
            Checked::Done(Ok(identity)) => {
                if let Some(identity) = identity {
                    req.extensions_mut().insert(identity);
                }
                Either::Left(passthrough(self.service.call(req)))
            }
            Checked::Done(Err(error)) => {
                Either::Right(Either::Left(ready(Ok(req.error_response(error).map_into_right_body()))))
            }
            // Rare (a key the set lacks): the one path that waits, boxed.
            Checked::AfterRefetch(retry) => {
                let service = self.service.clone();
                Either::Right(Either::Right(Box::pin(async move {
                    match retry.check().await {
                        Ok(identity) => {
                            if let Some(identity) = identity {
                                req.extensions_mut().insert(identity);
                            }
                            service.call(req).await.map(ServiceResponse::map_into_left_body)
                        }
                        Err(error) => Ok(req.error_response(error).map_into_right_body()),
                    }
                })))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(value: &'static str) -> Option<String> {
        bearer_token(&HeaderValue::from_static(value)).map(|bearer| bearer.token().to_string())
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_needs_a_token() {
        assert_eq!(token("Bearer abc"), Some("abc".into()));
        assert_eq!(token("bearer abc"), Some("abc".into()));
        assert_eq!(token("BEARER   abc  "), Some("abc".into()));
        assert_eq!(token("Bearer "), None);
        assert_eq!(token("Bearer"), None);
        assert_eq!(token("Basic dXNlcjpwYXNz"), None);
        assert_eq!(token("Token abc"), None);
    }
}
