//! Step 1 of the pipeline: a valid incoming `X-Request-Id` (1–128 of
//! `[A-Za-z0-9._-]`) is kept, anything else is replaced by a new UUID. The id
//! is stored in the request's extensions (for the log span and the upstream
//! request) and set on the response.

use std::future::{ready, Future, Ready};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{Error, HttpMessage, HttpRequest};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id and arrival time, in the request's extensions.
#[derive(Debug, Clone)]
pub struct RequestId {
    pub value: HeaderValue,
    pub started: Instant,
}

impl RequestId {
    pub fn as_str(&self) -> &str {
        self.value.to_str().unwrap_or("")
    }
}

pub fn is_valid_request_id(value: &[u8]) -> bool {
    (1..=128).contains(&value.len())
        && value
            .iter()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
}

fn request_id_for(req: &ServiceRequest) -> HeaderValue {
    match req.headers().get(&X_REQUEST_ID) {
        Some(value) if is_valid_request_id(value.as_bytes()) => value.clone(),
        _ => {
            let mut buffer = uuid::Uuid::encode_buffer();
            let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buffer);
            HeaderValue::from_str(text).expect("a UUID is a valid header value")
        }
    }
}

pub struct RequestIds;

impl<S, B> Transform<S, ServiceRequest> for RequestIds
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Transform = RequestIdService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(RequestIdService { service }))
    }
}

pub struct RequestIdService<S> {
    service: S,
}

impl<S, B> Service<ServiceRequest> for RequestIdService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Future = WithRequestId<S::Future>;

    actix_web::dev::forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let id = request_id_for(&req);
        req.extensions_mut().insert(RequestId {
            value: id.clone(),
            started: Instant::now(),
        });
        let request = req.request().clone();
        WithRequestId {
            response: self.service.call(req),
            id: Some(id),
            request: Some(request),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner response with `X-Request-Id` set; an error that escaped the
    /// inner layers becomes the spec's 500 (not boxed: this layer wraps every
    /// request).
    pub struct WithRequestId<F> {
        #[pin]
        response: F,
        id: Option<HeaderValue>,
        request: Option<HttpRequest>,
    }
}

impl<F, B> Future for WithRequestId<F>
where
    F: Future<Output = Result<ServiceResponse<B>, Error>>,
    B: MessageBody,
{
    type Output = Result<ServiceResponse<EitherBody<B>>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let outcome = std::task::ready!(this.response.poll(cx));
        let id = this.id.take().expect("polled after completion");
        let request = this.request.take().expect("polled after completion");
        let mut response = match outcome {
            Ok(response) => response.map_into_left_body(),
            Err(error) => {
                tracing::error!(request_id = %id.to_str().unwrap_or(""), error = %error, "unhandled error in the pipeline");
                let internal = crate::error::GatewayError::Internal(error.to_string());
                ServiceResponse::new(request, actix_web::ResponseError::error_response(&internal)).map_into_right_body()
            }
        };
        response.headers_mut().insert(X_REQUEST_ID, id);
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::is_valid_request_id;

    #[test]
    fn request_ids_are_checked_against_the_spec_alphabet() {
        assert!(is_valid_request_id(b"abc-123_X.y"));
        assert!(is_valid_request_id(&[b'a'; 128]));
        assert!(!is_valid_request_id(&[b'a'; 129]));
        assert!(!is_valid_request_id(b""));
        assert!(!is_valid_request_id(b"has space"));
        assert!(!is_valid_request_id(b"semi;colon"));
        assert!(!is_valid_request_id("caf\u{e9}".as_bytes()));
    }
}
