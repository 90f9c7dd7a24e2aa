//! `idhal serve`'s HTTP front: hyper's HTTP/1 server on a tokio runtime, with the limits of
//! `[limits.http]` — connections, timeouts, body and head sizes — and a graceful stop on
//! SIGTERM/SIGINT. What is answered lives in `routes`.

mod io;
pub(crate) mod routes;

use crate::config::HttpLimits;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use io::{Activity, TimedIo};
use routes::App;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

pub(crate) use routes::StaticFiles;

/// Why the server stopped.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Stopped {
    /// SIGTERM or SIGINT, and every request in flight finished.
    Signal,
    /// SIGTERM or SIGINT, but requests were still running at the end of the grace period.
    GraceExpired { unfinished: usize },
}

/// The answer to a connection past `max_connections`: short enough to go out in one
/// non-blocking write to a fresh socket.
const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
Content-Length: 31\r\nRetry-After: 1\r\nConnection: close\r\n\r\nserver busy, retry in a moment\n";

/// Accepts connections until SIGTERM/SIGINT, then stops accepting, lets the requests in flight
/// finish (at most `shutdown_grace_ms`) and returns.
pub(crate) async fn serve(listener: TcpListener, app: Arc<App>) -> std::io::Result<Stopped> {
    let limits = app.limits.clone();
    let max = usize::try_from(limits.max_connections).unwrap_or(usize::MAX);
    let slots = Arc::new(Semaphore::new(max));
    // Connections waiting for a slot; past this they get 503 at once, so waiting costs bounded memory.
    let waiting = Arc::new(Semaphore::new(max));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HttpLimits::ms(limits.header_timeout_ms))
        .max_buf_size(
            usize::try_from(limits.max_header_bytes)
                .unwrap_or(usize::MAX)
                .max(8192),
        )
        .max_headers(100);
    let http = Arc::new(http);
    // Told once, when the signal arrives: each connection then finishes its request and closes.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        let (stream, remote) = tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            // Reap finished connection tasks so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors (or similar): back off instead of spinning; the
                    // connections already open keep being served.
                    eprintln!("idhal serve: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => match Arc::clone(&waiting).try_acquire_owned() {
                Ok(wait) => {
                    let (slots, app, http, stop) = (
                        Arc::clone(&slots),
                        Arc::clone(&app),
                        Arc::clone(&http),
                        stop_rx.clone(),
                    );
                    let patience = HttpLimits::ms(limits.connection_wait_ms);
                    connections.spawn(async move {
                        let slot = tokio::time::timeout(patience, slots.acquire_owned()).await;
                        drop(wait);
                        match slot {
                            Ok(Ok(slot)) => {
                                connection(stream, remote, app, &http, stop).await;
                                drop(slot);
                            }
                            _ => busy(&stream, remote),
                        }
                    });
                    continue;
                }
                Err(_) => {
                    busy(&stream, remote);
                    continue;
                }
            },
        };
        let (app, http, stop) = (Arc::clone(&app), Arc::clone(&http), stop_rx.clone());
        connections.spawn(async move {
            connection(stream, remote, app, &http, stop).await;
            drop(slot);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let in_flight = connections.len();
    if in_flight > 0 {
        eprintln!("idhal serve: stopping: {in_flight} connection(s) finishing their request");
    }
    let grace = HttpLimits::ms(limits.shutdown_grace_ms);
    let all_done = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, all_done).await.is_err() {
        let unfinished = connections.len();
        connections.abort_all();
        return Ok(Stopped::GraceExpired { unfinished });
    }
    Ok(Stopped::Signal)
}

/// 503 for a connection past the limits, in one non-blocking write (a fresh socket's buffer
/// takes it), then closed.
fn busy(stream: &TcpStream, remote: std::net::SocketAddr) {
    let _ = stream.try_write(BUSY);
    eprintln!("{remote} - 503 (more than max_connections)");
}

/// Serves one connection until it closes, times out, or the server stops (then the request in
/// flight finishes first).
async fn connection(
    stream: TcpStream,
    remote: std::net::SocketAddr,
    app: Arc<App>,
    http: &http1::Builder,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let limits = &app.limits;
    let activity = Activity::new();
    let io = TimedIo::new(
        stream,
        Arc::clone(&activity),
        HttpLimits::ms(limits.idle_timeout_ms),
        HttpLimits::ms(limits.write_timeout_ms),
    );
    let service = hyper::service::service_fn({
        let app = Arc::clone(&app);
        move |request| {
            let busy = activity.busy();
            let app = Arc::clone(&app);
            async move { Ok::<_, std::convert::Infallible>(app.respond(request, remote, busy).await) }
        }
    });
    let conn = http.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = async { drop(stop.wait_for(|s| *s).await) } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        // Timeouts, resets and malformed requests (hyper answered 400/431 itself) end here.
        if !e.is_incomplete_message() {
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why = format!("{why}: {s}");
                source = s.source();
            }
            eprintln!("{remote} - connection closed: {why}");
        }
    }
}

/// Whether `[limits.http] max_connections` sockets fit under the open-file limit.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum OpenFiles {
    /// They fit (the soft limit was raised if it had to be).
    Fit,
    /// The soft limit stays at `soft` (the hard limit is lower, or raising failed): serve at
    /// most `fits` connections.
    Short { soft: u64, fits: u32 },
}

/// Descriptors kept for PUBDIR's files, the state database and the runtime itself.
const RESERVED_FILES: u64 = 64;

/// Raises the soft open-file limit so `max_connections` sockets fit (plus files and the state
/// database); when the hard limit is lower, says how many connections fit instead.
pub(crate) fn fit_open_files(max_connections: u32) -> OpenFiles {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    fit_under(max_connections, limit.current, limit.maximum, |soft| {
        let mut raised = limit;
        raised.current = Some(soft);
        setrlimit(Resource::Nofile, raised).is_ok()
    })
}

/// The decision of `fit_open_files` over a soft and hard limit (`None`: unlimited) and a way
/// to raise the soft one.
fn fit_under(
    max_connections: u32,
    soft: Option<u64>,
    hard: Option<u64>,
    raise: impl FnOnce(u64) -> bool,
) -> OpenFiles {
    let want = u64::from(max_connections) + RESERVED_FILES;
    let soft = soft.unwrap_or(u64::MAX);
    if soft >= want {
        return OpenFiles::Fit;
    }
    let target = want.min(hard.unwrap_or(u64::MAX));
    let soft = if raise(target) { target } else { soft };
    if soft >= want {
        return OpenFiles::Fit;
    }
    let fits = u32::try_from(soft.saturating_sub(RESERVED_FILES).max(1)).unwrap_or(u32::MAX);
    OpenFiles::Short { soft, fits }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_files_are_raised_or_connections_cut_to_fit() {
        let never = |_| -> bool { panic!("raised though it fits") };
        assert_eq!(
            fit_under(4096, Some(8192), Some(8192), never),
            OpenFiles::Fit
        );
        assert_eq!(fit_under(4096, None, None, never), OpenFiles::Fit);
        // Raised to exactly what is needed.
        let mut asked = None;
        let got = fit_under(4096, Some(1024), Some(1 << 20), |s| {
            asked = Some(s);
            true
        });
        assert_eq!((got, asked), (OpenFiles::Fit, Some(4096 + 64)));
        // The hard limit is lower: raised to it, and the connections cut to what fits.
        assert_eq!(
            fit_under(4096, Some(1024), Some(2048), |s| s == 2048),
            OpenFiles::Short {
                soft: 2048,
                fits: 2048 - 64
            }
        );
        // Raising refused: the old soft limit stands.
        assert_eq!(
            fit_under(4096, Some(1024), None, |_| false),
            OpenFiles::Short {
                soft: 1024,
                fits: 1024 - 64
            }
        );
        // A limit below the reserve still serves one connection.
        assert_eq!(
            fit_under(10, Some(20), Some(20), |_| true),
            OpenFiles::Short { soft: 20, fits: 1 }
        );
    }
}
