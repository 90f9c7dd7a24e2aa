//! The socket under one HTTP connection, with the two timeouts hyper does not have: a client
//! that sends nothing at all (idle) and a client that stopped reading our response (write).
//! hyper's own header timeout covers a client that sends its head too slowly.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// What the request side tells the socket side: whether a request is being answered, and since
/// when the connection has been idle. Shared by [`TimedIo`] and the connection's service.
#[derive(Debug)]
pub(crate) struct Activity {
    start: Instant,
    in_flight: AtomicU32,
    /// Milliseconds after `start` when the last response was handed to hyper.
    idle_since_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            in_flight: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(0),
        })
    }

    /// A request arrived; the returned guard marks the connection idle again when dropped
    /// (hyper drops the response body once it has taken all of it).
    pub(crate) fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(Arc::clone(self))
    }

    fn ms_since_start(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.start).as_millis()).unwrap_or(u64::MAX)
    }
}

/// See [`Activity::busy`].
#[derive(Debug)]
pub(crate) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_ms
            .store(a.ms_since_start(Instant::now()), Ordering::SeqCst);
        a.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A TCP stream that fails reads with `TimedOut` when the connection is idle (no request in
/// flight, no byte received since the last response) for `idle`, and fails writes that make no
/// progress for `write`.
pub(crate) struct TimedIo {
    inner: TcpStream,
    activity: Arc<Activity>,
    idle: Duration,
    write: Duration,
    /// When the last byte was received, in ms after `activity.start`; `None` before the first.
    last_byte_ms: Option<u64>,
    read_timer: Option<Pin<Box<Sleep>>>,
    write_timer: Option<Pin<Box<Sleep>>>,
}

impl TimedIo {
    pub(crate) fn new(
        inner: TcpStream,
        activity: Arc<Activity>,
        idle: Duration,
        write: Duration,
    ) -> TimedIo {
        TimedIo {
            inner,
            activity,
            idle,
            write,
            last_byte_ms: None,
            read_timer: None,
            write_timer: None,
        }
    }

    /// When an idle connection is to be closed, or `None` while it is not idle: a request is
    /// being answered, or the client has started sending the next one (hyper's header timeout
    /// takes over from there).
    fn idle_deadline(&self) -> Option<Instant> {
        let a = &self.activity;
        if a.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let since = a.idle_since_ms.load(Ordering::SeqCst);
        match self.last_byte_ms {
            Some(byte) if byte >= since => None,
            _ => Some(a.start + Duration::from_millis(since) + self.idle),
        }
    }

    /// Polls the write timer after a write returned Pending; `Err` once it has fired.
    fn poll_write_timer(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let deadline = Instant::now() + self.write;
        let timer = self
            .write_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading (write timeout)",
            ));
        }
        Ok(())
    }

    /// Wraps one write-side poll: progress resets the timer, Pending arms it.
    fn on_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(r) => {
                self.write_timer = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                self.poll_write_timer(cx)?;
                Poll::Pending
            }
        }
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.last_byte_ms = Some(this.activity.ms_since_start(Instant::now()));
                    this.read_timer = None;
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let Some(deadline) = this.idle_deadline() else {
                    this.read_timer = None;
                    return Poll::Pending;
                };
                let timer = this
                    .read_timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                ready!(timer.as_mut().poll(cx));
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client sent nothing (idle timeout)",
                )))
            }
        }
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.on_write(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.on_write(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        this.on_write(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.on_write(cx, poll)
    }
}
