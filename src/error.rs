//! One error type for everything the gateway answers itself, mapped in one
//! place to the spec's status codes and JSON bodies. Causes are logged with
//! the request id; the client only ever sees the minimal body.

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

/// Where a failure came from decides its status class, as in Pingora:
/// downstream → 4xx, upstream → 503/504, inside → 500.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("no route for the path")]
    NotFound,
    #[error("no route allows the method")]
    MethodNotAllowed { allow: HeaderValue },
    #[error("request body larger than server.max_body_bytes")]
    PayloadTooLarge,
    #[error("request head larger than server.max_header_bytes")]
    HeaderFieldsTooLarge,
    #[error("request line alone larger than server.max_header_bytes")]
    UriTooLong,
    #[error("access token required")]
    TokenRequired,
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("token lacks every required role")]
    InsufficientPermissions,
    #[error("no key set from the identity provider yet")]
    AuthenticationUnavailable,
    #[error("rate limited by policy {policy}")]
    RateLimited {
        policy: String,
        message: String,
        /// Seconds until the policy admits again.
        retry_after: u64,
    },
    #[error("rate limit backend unavailable")]
    RateLimitBackendUnavailable,
    #[error("service {service} unavailable: {reason}")]
    ServiceUnavailable { service: String, reason: String },
    #[error("service {service} gave no response head in time")]
    GatewayTimeout { service: String },
    #[error("service {service} sent a response that cannot be parsed: {reason}")]
    BadGateway { service: String, reason: String },
    #[error("internal gateway error: {0}")]
    Internal(String),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<&'a str>,
}

impl GatewayError {
    /// The `error` field of the JSON body.
    fn public_message(&self) -> &str {
        match self {
            Self::BadRequest(_) => "Bad request",
            Self::NotFound => "Not found",
            Self::MethodNotAllowed { .. } => "Method not allowed",
            Self::PayloadTooLarge => "Payload too large",
            Self::HeaderFieldsTooLarge => "Request header fields too large",
            Self::UriTooLong => "URI too long",
            Self::TokenRequired => "Access token required",
            Self::InvalidToken(_) => "Invalid token",
            Self::InsufficientPermissions => "Insufficient permissions",
            Self::AuthenticationUnavailable => "Authentication unavailable",
            Self::RateLimited { message, .. } => message,
            Self::RateLimitBackendUnavailable => "Rate limit backend unavailable",
            Self::ServiceUnavailable { .. } => "Service unavailable",
            Self::GatewayTimeout { .. } => "Gateway timeout",
            Self::BadGateway { .. } => "Bad gateway",
            Self::Internal(_) => "Internal gateway error",
        }
    }

    fn service(&self) -> Option<&str> {
        match self {
            Self::ServiceUnavailable { service, .. }
            | Self::GatewayTimeout { service }
            | Self::BadGateway { service, .. } => Some(service),
            _ => None,
        }
    }
}

impl ResponseError for GatewayError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::HeaderFieldsTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::UriTooLong => StatusCode::URI_TOO_LONG,
            Self::TokenRequired => StatusCode::UNAUTHORIZED,
            Self::InvalidToken(_) | Self::InsufficientPermissions => StatusCode::FORBIDDEN,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::RateLimitBackendUnavailable | Self::ServiceUnavailable { .. } | Self::AuthenticationUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::GatewayTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::BadGateway { .. } => StatusCode::BAD_GATEWAY,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        // While the provider's keys are missing every token request gets
        // this; the fetcher's own warning says why, once per fetch.
        if status.is_server_error() && !matches!(self, Self::AuthenticationUnavailable) {
            tracing::warn!(status = status.as_u16(), cause = %self, "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), cause = %self, "request refused");
        }
        let body = ErrorBody {
            error: self.public_message(),
            service: self.service(),
        };
        let mut response = HttpResponse::build(status);
        response.insert_header((header::CONTENT_TYPE, HeaderValue::from_static("application/json")));
        match self {
            Self::MethodNotAllowed { allow } => {
                response.insert_header((header::ALLOW, allow.clone()));
            }
            Self::TokenRequired => {
                response.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
            }
            Self::RateLimited { retry_after, .. } => {
                response.insert_header((header::RETRY_AFTER, *retry_after));
            }
            _ => {}
        }
        response
            .body(serde_json::to_string(&body).unwrap_or_else(|_| r#"{"error":"Internal gateway error"}"#.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::MessageBody;

    fn body_of(error: GatewayError) -> (u16, String) {
        let response = error.error_response();
        let status = response.status().as_u16();
        let bytes = response.into_body().try_into_bytes().unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[test]
    fn bodies_match_the_spec() {
        let cases = [
            (GatewayError::BadRequest("x"), 400, r#"{"error":"Bad request"}"#),
            (GatewayError::NotFound, 404, r#"{"error":"Not found"}"#),
            (GatewayError::PayloadTooLarge, 413, r#"{"error":"Payload too large"}"#),
            (
                GatewayError::HeaderFieldsTooLarge,
                431,
                r#"{"error":"Request header fields too large"}"#,
            ),
            (GatewayError::UriTooLong, 414, r#"{"error":"URI too long"}"#),
            (
                GatewayError::BadGateway {
                    service: "user".into(),
                    reason: "too many headers".into(),
                },
                502,
                r#"{"error":"Bad gateway","service":"user"}"#,
            ),
            (GatewayError::TokenRequired, 401, r#"{"error":"Access token required"}"#),
            (
                GatewayError::InvalidToken("exp".into()),
                403,
                r#"{"error":"Invalid token"}"#,
            ),
            (
                GatewayError::InsufficientPermissions,
                403,
                r#"{"error":"Insufficient permissions"}"#,
            ),
            (
                GatewayError::AuthenticationUnavailable,
                503,
                r#"{"error":"Authentication unavailable"}"#,
            ),
            (
                GatewayError::ServiceUnavailable {
                    service: "user".into(),
                    reason: "refused".into(),
                },
                503,
                r#"{"error":"Service unavailable","service":"user"}"#,
            ),
            (
                GatewayError::GatewayTimeout { service: "user".into() },
                504,
                r#"{"error":"Gateway timeout","service":"user"}"#,
            ),
            (
                GatewayError::Internal("boom".into()),
                500,
                r#"{"error":"Internal gateway error"}"#,
            ),
            (
                GatewayError::RateLimitBackendUnavailable,
                503,
                r#"{"error":"Rate limit backend unavailable"}"#,
            ),
        ];
        for (error, status, body) in cases {
            assert_eq!(body_of(error), (status, body.to_owned()));
        }
    }
}
