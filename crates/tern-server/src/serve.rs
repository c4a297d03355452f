//! Accepting connections with limits and timeouts: what a hostile network can do to the
//! listener is bounded.
//!
//! - **Connections**: at most `max_connections` open in all and `max_connections_per_peer`
//!   from one IPv4 address or IPv6 /64; one over a limit is closed as it arrives.
//! - **Headers**: a request's headers must arrive within `header_timeout_secs`, counted
//!   from the connection's start for its first request and from the first byte of each
//!   later one: a client sending one byte every few seconds is cut off. A byte that
//!   arrives while the previous request is handled or its answer still streams (a
//!   download) starts the clock when that answer has ended, not under it.
//! - **Idle**: a connection that moves no byte either way for `idle_timeout_secs` while no
//!   handler is running is closed: an idle keep-alive connection, and a client that
//!   stopped reading its response (whose writes would otherwise wait for ever).
//! - **TLS**: the handshake must finish within the header timeout.
//!
//! The header and idle clocks are kept here (`IdleIo`), not by hyper: hyper's header-read
//! timeout also runs while a keep-alive connection waits for its next request, so it closed
//! a connection idle for the header timeout (10 s) however long the idle timeout, and a
//! client reusing it at that moment saw "connection closed before message completed". One
//! bound is looser than the rule: the start of a head that came in the same read as the
//! previous request is seen by hyper alone, so it is cut off by the idle timeout and then
//! the header timeout, as a connection idle that long and then trickling would be.
//!
//! Request bodies and handlers are bounded by the router (`api`): a whole-request timeout,
//! and a minimum rate for bundle uploads.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

use crate::api::PollFront;
use crate::tls::PeerCert;

/// The listener's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections in all.
    pub max_connections: usize,
    /// Open connections from one IP address.
    pub max_per_peer: usize,
    /// To receive a request's headers (and finish a TLS handshake).
    pub header_timeout: Duration,
    /// With no byte moving while no request is handled.
    pub idle_timeout: Duration,
}

impl Limits {
    /// The configuration's limits.
    pub fn of(cfg: &crate::ServerConfig) -> Self {
        // Timeouts of a day at most: a huge value must not overflow the clock.
        Limits {
            max_connections: cfg.max_connections.max(1) as usize,
            max_per_peer: cfg.max_connections_per_peer.max(1) as usize,
            header_timeout: Duration::from_secs(cfg.header_timeout_secs.clamp(1, 86_400)),
            idle_timeout: Duration::from_secs(cfg.idle_timeout_secs.clamp(1, 86_400)),
        }
    }
}

/// The client's address, as a request extension.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// What the per-peer limit counts by: an IPv4 address, or an IPv6 /64 (what one customer
/// usually gets, and can spread connections over).
fn peer_group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Open connections per IP address; an entry goes when its last connection closes.
#[derive(Default)]
struct PeerCounts(Mutex<HashMap<IpAddr, usize>>);

struct PeerSlot {
    counts: Arc<PeerCounts>,
    ip: IpAddr,
}

impl PeerCounts {
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<PeerSlot> {
        let mut m = self.0.lock().ok()?;
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.counts.0.lock() {
            if let Some(n) = m.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.ip);
                }
            }
        }
    }
}

/// Requests being handled on one connection (the idle rule does not apply meanwhile),
/// answers still streaming (no head clock starts meanwhile), and requests whose head has
/// arrived.
#[derive(Default)]
struct Busy {
    handling: AtomicUsize,
    responding: AtomicUsize,
    heads: AtomicU64,
}

struct BusyGuard(Arc<Busy>);

/// An answer's body, counted as streaming until it ends or is dropped.
struct Streaming {
    body: axum::body::Body,
    busy: Option<Arc<Busy>>,
}

impl Streaming {
    fn done(&mut self) {
        if let Some(busy) = self.busy.take() {
            busy.responding.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        self.done();
    }
}

impl http_body::Body for Streaming {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(frame, Poll::Ready(None | Some(Err(_)))) {
            self.done();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Busy {
    /// A request's head has arrived and is being handled until the guard goes.
    fn enter(self: &Arc<Self>) -> BusyGuard {
        self.arrived();
        self.handling.fetch_add(1, Ordering::Relaxed);
        BusyGuard(self.clone())
    }

    /// A request's head has arrived (and was answered at once).
    fn arrived(&self) {
        self.heads.fetch_add(1, Ordering::Relaxed);
    }

    /// The answer to a handled request streams until its body ends.
    fn streaming(self: &Arc<Self>, answer: axum::response::Response) -> axum::response::Response {
        self.responding.fetch_add(1, Ordering::Relaxed);
        let busy = Some(self.clone());
        answer.map(|body| axum::body::Body::new(Streaming { body, busy }))
    }

    fn handling(&self) -> bool {
        self.handling.load(Ordering::Relaxed) > 0
    }

    /// Whether a request is handled or its answer still streams.
    fn answering(&self) -> bool {
        self.handling() || self.responding.load(Ordering::Relaxed) > 0
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.handling.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection that fails with `TimedOut` when no byte moved either way for `timeout`
/// while no request is being handled, or when a request's head has not arrived within
/// `head_timeout`.
struct IdleIo<T> {
    inner: T,
    timeout: Duration,
    deadline: Instant,
    head_timeout: Duration,
    /// The head being received: when it must have arrived, and the heads counted before it.
    head: Option<(Instant, u64)>,
    /// Bytes came in while a request was answered: a head's clock starts when it ends.
    early: bool,
    sleep: Pin<Box<Sleep>>,
    busy: Arc<Busy>,
}

impl<T> IdleIo<T> {
    fn new(inner: T, limits: &Limits, busy: Arc<Busy>) -> Self {
        let now = Instant::now();
        // The first request's head (and a TLS handshake before it) counts from the start.
        let head = now + limits.header_timeout;
        IdleIo {
            inner,
            timeout: limits.idle_timeout,
            deadline: now + limits.idle_timeout,
            head_timeout: limits.header_timeout,
            head: Some((head, 0)),
            early: false,
            sleep: Box::pin(tokio::time::sleep_until(head.min(now + limits.idle_timeout))),
            busy,
        }
    }

    fn moved(&mut self) {
        // Only the deadline moves here; the timer is re-armed when it fires early.
        self.deadline = Instant::now() + self.timeout;
    }

    /// Bytes came in: the first of a request's head starts its clock.
    fn received(&mut self) {
        self.moved();
        let heads = self.busy.heads.load(Ordering::Relaxed);
        if self.head.is_some_and(|(_, counted)| counted == heads) {
            return;
        }
        self.head = None;
        if self.busy.answering() {
            self.early = true;
        } else {
            self.start_head(heads);
        }
    }

    /// A head's clock starts now, for the head after the `heads` counted.
    fn start_head(&mut self, heads: u64) {
        let due = Instant::now() + self.head_timeout;
        self.head = Some((due, heads));
        if due < self.sleep.deadline() {
            self.sleep.as_mut().reset(due);
        }
    }

    /// When the head being received must have arrived, if one is.
    fn head_due(&mut self) -> Option<Instant> {
        let heads = self.busy.heads.load(Ordering::Relaxed);
        match self.head {
            Some((due, counted)) if counted == heads && !self.busy.answering() => Some(due),
            _ => {
                self.head = None;
                None
            }
        }
    }

    /// Called when the inner I/O is pending: `Err` once the connection has been idle too
    /// long, or a request's head is late.
    fn idle(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.early && !self.busy.answering() {
            // What came in during the last answer is the start of the next head.
            self.early = false;
            self.start_head(self.busy.heads.load(Ordering::Relaxed));
        }
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
            if self.busy.handling() {
                self.moved();
            }
            let now = Instant::now();
            let head = self.head_due();
            if head.is_some_and(|due| due <= now) {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "request head not received in time",
                ));
            }
            if self.deadline <= now {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "connection idle"));
            }
            let next = head.map_or(self.deadline, |due| due.min(self.deadline));
            self.sleep.as_mut().reset(next);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.received();
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.idle(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.moved();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.idle(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => match self.idle(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
            ready => ready,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accept connections on `listener` and serve `app` on each (over TLS with `tls`, on the
/// request workers of `lanes`) until `shutdown` completes; `front` answers the polls ahead
/// of `app`.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    front: Arc<PollFront>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let peers = Arc::new(PeerCounts::default());
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            continue;
        };
        let Some(slot) = peers.take(peer_group(addr.ip()), limits.max_per_peer) else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        // Handed to a request worker, whose reactor it is registered with from then on.
        let Ok(tcp) = tcp.into_std() else {
            continue;
        };
        let (app, front) = (app.clone(), front.clone());
        let tls = tls.clone();
        crate::lanes::connection(move || async move {
            let _held = (permit, slot);
            let Ok(tcp) = TcpStream::from_std(tcp) else {
                return;
            };
            connection(tcp, addr, Routes { app, front }, tls, limits).await;
        });
    }
}

/// What answers a connection's requests.
struct Routes {
    app: axum::Router,
    front: Arc<PollFront>,
}

async fn connection(
    tcp: TcpStream,
    addr: SocketAddr,
    app: Routes,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
) {
    let busy = Arc::new(Busy::default());
    let io = IdleIo::new(tcp, &limits, busy.clone());
    match tls {
        None => http(io, addr, PeerCert(None), app, busy).await,
        Some(acceptor) => {
            let Ok(Ok(stream)) = tokio::time::timeout(limits.header_timeout, acceptor.accept(io)).await else {
                return;
            };
            let cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| Arc::new(c.as_ref().to_vec()));
            http(stream, addr, PeerCert(cert), app, busy).await
        }
    }
}

async fn http<I>(io: I, addr: SocketAddr, cert: PeerCert, routes: Routes, busy: Arc<Busy>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use futures_util::future::Either;
    use tower::ServiceExt;
    let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        if let Some(answer) = routes.front.answer(&req) {
            busy.arrived();
            return Either::Left(std::future::ready(Ok(answer)));
        }
        let app = routes.app.clone();
        let busy = busy.clone();
        req.extensions_mut().insert(cert.clone());
        req.extensions_mut().insert(Peer(addr));
        Either::Right(async move {
            let _handling = busy.enter();
            let answer = app.oneshot(req.map(axum::body::Body::new)).await;
            answer.map(|a| busy.streaming(a))
        })
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
}
