//! Answers 400 `{"error":"Bad request"}` when a client's chunked body turns
//! out malformed, whether the bad chunk arrives with the head or later.
//!
//! actix-http 3.20 reports a chunked-body decode error as an I/O error, and
//! its HTTP/1 dispatcher takes any I/O error while decoding for the client
//! going away (`ParseError::Io` → `client_disconnected`, h1/dispatcher.rs):
//! it polls the request's future once more, writes whatever response is
//! ready by then, and closes the connection without a log line. When the bad
//! chunk comes after the head, the proxy is already reading the body and
//! answers 400 in that last poll; when it comes in the same read as the head,
//! the request is still waiting for the balancer or the rate limiter, and
//! the client used to get nothing at all.
//!
//! So for a chunked request this layer reads ahead of whoever consumes the
//! body, on every poll, what has already arrived: the failure is seen, and
//! answered, in that last poll either way. It holds at most
//! [`LOOKAHEAD_BYTES`] (and the chunk that crosses it), so a failure behind
//! more than that in one read still ends in actix's silent close. Requests
//! without `Transfer-Encoding` pass untouched.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::{ready, Future, Ready};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Payload, Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::error::PayloadError;
use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{Error, HttpMessage, HttpRequest, ResponseError};
use futures_util::Stream;

use crate::error::GatewayError;

/// Body bytes read ahead of the consumer, at most: as much as actix-http's
/// own payload buffers before it stops reading, so an upload waiting on a
/// slow upstream holds at most twice what it did without this layer.
const LOOKAHEAD_BYTES: usize = 32 * 1024;

pub struct BodyCheck;

impl<S, B> Transform<S, ServiceRequest> for BodyCheck
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Transform = BodyCheckService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(BodyCheckService { service }))
    }
}

pub struct BodyCheckService<S> {
    service: S,
}

impl<S, B> Service<ServiceRequest> for BodyCheckService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Future = Checked<S::Future>;

    actix_web::dev::forward_ready!(service);

    fn call(&self, mut req: ServiceRequest) -> Self::Future {
        if !req.headers().contains_key(header::TRANSFER_ENCODING) {
            return Checked {
                response: self.service.call(req),
                body: None,
            };
        }
        let lookahead = Rc::new(RefCell::new(Lookahead {
            payload: req.take_payload(),
            held: VecDeque::new(),
            held_bytes: 0,
            ended: false,
        }));
        req.set_payload(Payload::from(
            Box::pin(AheadPayload(lookahead.clone())) as Pin<Box<dyn Stream<Item = _>>>
        ));
        let request = req.request().clone();
        Checked {
            response: self.service.call(req),
            body: Some((lookahead, request)),
        }
    }
}

/// The client's body, read ahead of its consumer.
struct Lookahead {
    payload: Payload,
    held: VecDeque<Bytes>,
    held_bytes: usize,
    ended: bool,
}

impl Lookahead {
    /// Holds what has arrived, up to [`LOOKAHEAD_BYTES`]; the body's error
    /// if it is among that.
    fn look(&mut self, cx: &mut Context<'_>) -> Option<PayloadError> {
        while !self.ended && self.held_bytes < LOOKAHEAD_BYTES {
            match Pin::new(&mut self.payload).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    self.held_bytes += chunk.len();
                    self.held.push_back(chunk);
                }
                Poll::Ready(Some(Err(error))) => return Some(error),
                Poll::Ready(None) => self.ended = true,
                Poll::Pending => break,
            }
        }
        None
    }
}

/// The request's payload as its consumer sees it: the held chunks first.
struct AheadPayload(Rc<RefCell<Lookahead>>);

impl Stream for AheadPayload {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut lookahead = self.0.borrow_mut();
        if let Some(chunk) = lookahead.held.pop_front() {
            lookahead.held_bytes -= chunk.len();
            return Poll::Ready(Some(Ok(chunk)));
        }
        if lookahead.ended {
            return Poll::Ready(None);
        }
        let next = Pin::new(&mut lookahead.payload).poll_next(cx);
        if let Poll::Ready(None) = next {
            lookahead.ended = true;
        }
        next
    }
}

pin_project_lite::pin_project! {
    /// The inner response, unless the client's body fails first (not boxed:
    /// this layer wraps every request).
    pub struct Checked<F> {
        #[pin]
        response: F,
        body: Option<(Rc<RefCell<Lookahead>>, HttpRequest)>,
    }
}

impl<F, B> Future for Checked<F>
where
    F: Future<Output = Result<ServiceResponse<B>, Error>>,
    B: MessageBody,
{
    type Output = Result<ServiceResponse<EitherBody<B>>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some((lookahead, request)) = this.body {
            // Looked at before the inner future, which may be waiting on
            // something else entirely when this is its last poll.
            if let Some(error) = lookahead.borrow_mut().look(cx) {
                tracing::debug!(%error, "the client's chunked body failed");
                let refused = GatewayError::BadRequest("malformed request body");
                let response = ServiceResponse::new(request.clone(), refused.error_response());
                return Poll::Ready(Ok(response.map_into_right_body()));
            }
        }
        let response = std::task::ready!(this.response.poll(cx))?;
        // The consumer reads on alone from here.
        *this.body = None;
        Poll::Ready(Ok(response.map_into_left_body()))
    }
}
