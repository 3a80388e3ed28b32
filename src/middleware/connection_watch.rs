//! Closes keep-alive connections that stall inside a request head.
//!
//! actix-http 3.20 arms its request-head timer (`client_request_timeout_ms`,
//! 408) only for the first request of a connection: once a keep-alive
//! connection has served a response, a client that sends half of the next
//! head is never timed out, and can hold the connection forever (slowloris).
//!
//! So every connection gets a watchdog: the middleware counts the requests
//! in flight on the connection (a response counts until its body is fully
//! sent), and a connection with nothing in flight for longer than the
//! keep-alive timeout plus the head timeout (when actix would have closed an
//! idle connection, or answered 408, long ago) is shut down. The watchdog
//! only touches the socket while the connection's extensions are alive, and
//! actix-http keeps those exactly as long as the socket (see `shut_down`); it
//! ends as soon as the connection is gone. An open WebSocket tunnel is a
//! request in flight (its 101 response's body streams until the tunnel
//! ends), so the watchdog never cuts a quiet tunnel; the tunnel's own idle
//! limit does (SPEC §9).

use std::any::Any;
use std::cell::Cell;
use std::future::{ready, Future, Ready};
use std::mem::ManuallyDrop;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::{Extensions, Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::web::Bytes;
use actix_web::Error;

/// How often a watchdog looks at its connection.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What the watchdog knows of one connection.
#[derive(Debug)]
struct ConnectionActivity {
    in_flight: Cell<u32>,
    idle_since: Cell<Instant>,
}

/// The `HttpServer::on_connect` hook: starts the connection's watchdog.
/// `idle_limit` is how long a connection may sit with no request in flight.
pub fn watch_connection(idle_limit: Duration) -> impl Fn(&dyn Any, &mut Extensions) + Send + Sync + 'static {
    move |connection, extensions| {
        // HTTP/2 has no request-head timer to make up for: actix-http's
        // keep-alive covers it.
        let Some((stream, _)) = crate::tls::tcp_of(connection).filter(|_| !crate::tls::is_http2(connection)) else {
            return;
        };
        let socket = stream.as_raw_fd();
        let activity = Rc::new(ConnectionActivity {
            in_flight: Cell::new(0),
            idle_since: Cell::new(Instant::now()),
        });
        let watched = Rc::downgrade(&activity);
        extensions.insert(activity);
        actix_rt::spawn(watchdog(watched, socket, idle_limit));
    }
}

async fn watchdog(activity: Weak<ConnectionActivity>, socket: RawFd, idle_limit: Duration) {
    let mut ticks = actix_rt::time::interval(CHECK_EVERY);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        // The connection's extensions die with it (and with its last request).
        let Some(activity) = activity.upgrade() else {
            return;
        };
        if activity.in_flight.get() == 0 && activity.idle_since.get().elapsed() >= idle_limit {
            tracing::debug!("closing a keep-alive connection stalled in a request head");
            shut_down(socket, &activity);
            return;
        }
    }
}

/// Shuts the connection's socket down; the dispatcher then sees the end of
/// the stream and closes the connection itself.
fn shut_down(socket: RawFd, _alive: &Rc<ConnectionActivity>) {
    // SAFETY: `_alive` proves the connection's extensions are alive, and
    // actix-http's h1 dispatcher owns them together with the socket. It only
    // gives the socket away to an upgrade service, and actix-web's
    // `HttpServer` installs none: WebSocket tunnels (`crate::websocket`) are
    // served inside the dispatcher, as a response whose body streams until
    // the tunnel ends, so the descriptor is still this connection's. It is
    // borrowed, never closed here (`ManuallyDrop`).
    let socket = ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(socket) });
    let _ = socket.shutdown(Shutdown::Both);
}

/// Counts a request in flight until its response body is done.
struct InFlight(Rc<ConnectionActivity>);

impl InFlight {
    fn start(activity: Rc<ConnectionActivity>) -> Self {
        activity.in_flight.set(activity.in_flight.get() + 1);
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let left = self.0.in_flight.get().saturating_sub(1);
        self.0.in_flight.set(left);
        if left == 0 {
            self.0.idle_since.set(Instant::now());
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted while it streams.
    pub struct Watched<B> {
        #[pin]
        body: B,
        in_flight: Option<InFlight>,
    }
}

impl<B: MessageBody> MessageBody for Watched<B> {
    type Error = B::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Self::Error>>> {
        self.project().body.poll_next(cx)
    }
}

/// The middleware half: marks requests in flight on their connection.
pub struct ConnectionWatch;

impl<S, B> Transform<S, ServiceRequest> for ConnectionWatch
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<Watched<B>>;
    type Error = Error;
    type Transform = ConnectionWatchService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(ConnectionWatchService { service }))
    }
}

pub struct ConnectionWatchService<S> {
    service: S,
}

impl<S, B> Service<ServiceRequest> for ConnectionWatchService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<Watched<B>>;
    type Error = Error;
    type Future = WatchedResponse<S::Future>;

    actix_web::dev::forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let in_flight = req.conn_data::<Rc<ConnectionActivity>>().cloned().map(InFlight::start);
        WatchedResponse {
            response: self.service.call(req),
            in_flight,
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner response, its body wrapped in [`Watched`] (not boxed: this
    /// is the outermost layer of every request).
    pub struct WatchedResponse<F> {
        #[pin]
        response: F,
        in_flight: Option<InFlight>,
    }
}

impl<F, B> Future for WatchedResponse<F>
where
    F: Future<Output = Result<ServiceResponse<B>, Error>>,
{
    type Output = Result<ServiceResponse<Watched<B>>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.response.poll(cx))?;
        let in_flight = this.in_flight.take();
        Poll::Ready(Ok(response.map_body(|_, body| Watched { body, in_flight })))
    }
}
