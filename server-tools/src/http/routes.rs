//! What `idhal serve` answers: the routes (PUBDIR's files; `POST /enroll`, `POST /renew` and
//! `POST /peers` when the state dir holds a CA), the one place errors become status codes, the access log, and the bodies.

use crate::ca::enroll::{Enroller, Refusal};
use crate::ca::peers::{self as peers_service, Peers};
use crate::ca::renew::{self as renew_service, Renewer};
use crate::config::HttpLimits;
use crate::http::io::Busy;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use idhal_manifest::{enroll, peers, renew};
use std::io::{self, Read as _};
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// Why a request failed. `status` and `public_message` are the one mapping from errors to HTTP;
/// details that could help an attacker stay in the server's log.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpError {
    #[error("not found")]
    NotFound,
    #[error("method not allowed (allowed: {allow})")]
    MethodNotAllowed { allow: &'static str },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("request body too large (at most {max} bytes)")]
    TooLarge { max: u64 },
    #[error("request body not received in time")]
    BodyTimeout,
    #[error("internal error: {0}")]
    Internal(String),
    /// A handler's own refusal (enrollment): its status and the one line the client sees.
    #[error("{message}")]
    Refused { status: u16, message: String },
}

impl HttpError {
    pub(crate) fn status(&self) -> u16 {
        match self {
            HttpError::NotFound => 404,
            HttpError::MethodNotAllowed { .. } => 405,
            HttpError::BadRequest(_) => 400,
            HttpError::BodyTimeout => 408,
            HttpError::TooLarge { .. } => 413,
            HttpError::Internal(_) => 500,
            HttpError::Refused { status, .. } => *status,
        }
    }

    /// The short body sent to the client.
    fn public_message(&self) -> String {
        match self {
            HttpError::Internal(_) => "internal error\n".to_owned(),
            other => format!("{other}\n"),
        }
    }

    /// After these the request body may be unread or half read: the connection is not reused.
    fn closes(&self) -> bool {
        matches!(
            self,
            HttpError::TooLarge { .. } | HttpError::BodyTimeout | HttpError::BadRequest(_)
        )
    }

    fn reply(&self) -> Reply {
        let mut headers = Vec::new();
        if let HttpError::MethodNotAllowed { allow } = self {
            headers.push((header::ALLOW, *allow));
        }
        if self.closes() {
            headers.push((header::CONNECTION, "close"));
        }
        Reply {
            status: self.status(),
            content_type: "text/plain; charset=utf-8",
            headers,
            body: ReplyBody::bytes(self.public_message().into_bytes()),
        }
    }
}

/// A response before it becomes hyper's.
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) content_type: &'static str,
    pub(crate) headers: Vec<(header::HeaderName, &'static str)>,
    pub(crate) body: ReplyBody,
}

impl Reply {
    pub(crate) fn ok(content_type: &'static str, body: ReplyBody) -> Reply {
        Reply {
            status: 200,
            content_type,
            headers: Vec::new(),
            body,
        }
    }
}

/// Bytes of a file sent per frame: memory per busy connection stays at this.
const FILE_CHUNK: usize = 64 << 10;

/// A response body of known length (the agent's HTTP/1.0 client relies on Content-Length):
/// bytes in memory, or a file opened before the response started, so a concurrent rename in
/// PUBDIR cannot change what is sent mid-response. Holds the connection's [`Busy`] guard: the
/// connection counts as idle again once hyper has taken the whole body and dropped it.
pub(crate) struct ReplyBody {
    source: Source,
    remaining: u64,
    busy: Option<Busy>,
}

enum Source {
    Bytes(Option<Bytes>),
    /// Read on the runtime thread, a chunk per frame: PUBDIR is local and its files are in the
    /// page cache, so a read costs microseconds — less than handing it to a blocking thread
    /// (measured: that made 1 MiB GETs ~25% slower). On a network file system use a static web
    /// server instead.
    File(std::fs::File),
}

impl ReplyBody {
    pub(crate) fn bytes(b: Vec<u8>) -> ReplyBody {
        ReplyBody {
            remaining: b.len() as u64,
            source: Source::Bytes(Some(Bytes::from(b))),
            busy: None,
        }
    }

    fn file(file: std::fs::File, len: u64) -> ReplyBody {
        ReplyBody {
            remaining: len,
            source: Source::File(file),
            busy: None,
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.remaining
    }
}

impl hyper::body::Body for ReplyBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        match &mut this.source {
            Source::Bytes(b) => {
                this.remaining = 0;
                Poll::Ready(b.take().map(|b| Ok(Frame::data(b))))
            }
            Source::File(file) => {
                let want = usize::try_from(this.remaining)
                    .unwrap_or(usize::MAX)
                    .min(FILE_CHUNK);
                let mut chunk = Vec::with_capacity(want);
                let n = file.by_ref().take(want as u64).read_to_end(&mut chunk)?;
                if n == 0 {
                    // Content-Length is already sent: the client must see a short body.
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file shrank while being sent",
                    ))));
                }
                this.remaining -= n as u64;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Everything `idhal serve` answers.
pub(crate) struct App {
    pub(crate) files: StaticFiles,
    /// `POST /enroll`, when the state dir holds a CA.
    pub(crate) enroller: Option<Arc<Enroller>>,
    /// `POST /peers`, beside enrollment.
    pub(crate) peers: Option<Arc<Peers>>,
    /// `POST /renew`, beside enrollment.
    pub(crate) renew: Option<Arc<Renewer>>,
    pub(crate) limits: HttpLimits,
}

impl App {
    /// Answers one request and writes its access log line to stderr.
    pub(crate) async fn respond(
        self: Arc<Self>,
        request: Request<Incoming>,
        remote: SocketAddr,
        busy: Busy,
    ) -> Response<ReplyBody> {
        let started = Instant::now();
        let (method, target) = (request.method().clone(), request.uri().to_string());
        let reply = match self.route(request, remote).await {
            Ok(r) => r,
            Err(e) => {
                if let HttpError::Internal(detail) = &e {
                    eprintln!(
                        "idhal serve: internal error on {}: {detail}",
                        target.escape_debug()
                    );
                }
                e.reply()
            }
        };
        eprintln!(
            "{remote} \"{method} {}\" {} {} {}ms",
            target.escape_debug(),
            reply.status,
            reply.body.len(),
            started.elapsed().as_millis()
        );
        let mut body = reply.body;
        body.busy = Some(busy);
        let len = body.len();
        let mut response = Response::new(body);
        *response.status_mut() =
            StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(reply.content_type),
        );
        // Clients must revalidate: a stale manifest.minisig would hide a new publication.
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        for (name, value) in reply.headers {
            h.insert(name, HeaderValue::from_static(value));
        }
        response
    }

    async fn route(
        &self,
        request: Request<Incoming>,
        remote: SocketAddr,
    ) -> Result<Reply, HttpError> {
        // Before anything is read or allocated: a body announced larger than allowed.
        let declared = match request.headers().get(header::CONTENT_LENGTH) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| HttpError::BadRequest("malformed Content-Length".into()))?,
            ),
        };
        let path = request.uri().path().to_owned();
        let peers_path = self.peers.is_some() && path == format!("/{}", peers::PATH);
        let renew_path = self.renew.is_some() && path == format!("/{}", renew::PATH);
        let mut max = self.limits.max_body_bytes;
        // The formats' own bounds, below the general one.
        if peers_path {
            max = max.min(peers::MAX_REQUEST as u64);
        }
        if renew_path {
            max = max.min(renew::MAX_REQUEST as u64);
        }
        if declared.is_some_and(|n| n > max) {
            return Err(HttpError::TooLarge { max });
        }
        if !path.starts_with('/') {
            return Err(HttpError::BadRequest("the path must start with /".into()));
        }
        match (&self.enroller, &self.peers) {
            (Some(enroller), _) if path == format!("/{}", enroll::PATH) => {
                if request.method() != Method::POST {
                    return Err(HttpError::MethodNotAllowed { allow: "POST" });
                }
                let body = self.read_body(request.into_body(), max).await?;
                enrollment(Arc::clone(enroller), body, remote).await
            }
            (_, Some(service)) if peers_path => {
                if request.method() != Method::POST {
                    return Err(HttpError::MethodNotAllowed { allow: "POST" });
                }
                let body = self.read_body(request.into_body(), max).await?;
                registration(Arc::clone(service), body, remote).await
            }
            _ if renew_path => {
                if request.method() != Method::POST {
                    return Err(HttpError::MethodNotAllowed { allow: "POST" });
                }
                let body = self.read_body(request.into_body(), max).await?;
                let service = self.renew.as_ref().expect("renew_path: mounted");
                renewal(Arc::clone(service), body, remote).await
            }
            _ => {
                if !matches!(*request.method(), Method::GET | Method::HEAD) {
                    return Err(HttpError::MethodNotAllowed { allow: "GET, HEAD" });
                }
                self.files.serve(&path)
            }
        }
    }

    /// The whole body within `max` bytes (chunked ones are cut there) and `body_timeout_ms`.
    async fn read_body(&self, body: Incoming, max: u64) -> Result<Bytes, HttpError> {
        let limited = Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX));
        let collected = tokio::time::timeout(
            HttpLimits::ms(self.limits.body_timeout_ms),
            limited.collect(),
        )
        .await
        .map_err(|_| HttpError::BodyTimeout)?;
        match collected {
            Ok(c) => Ok(c.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                Err(HttpError::TooLarge { max })
            }
            Err(e) => Err(HttpError::BadRequest(format!("reading the body: {e}"))),
        }
    }
}

/// `POST /enroll`: the enrollment transaction runs on a blocking thread; it is not cancelled
/// when the client goes away, so a started enrollment always finishes or rolls back whole.
async fn enrollment(
    enroller: Arc<Enroller>,
    body: Bytes,
    remote: SocketAddr,
) -> Result<Reply, HttpError> {
    let result = tokio::task::spawn_blocking(move || {
        let result = enroller.enroll(&body, idhal_manifest::time::now());
        (result, body)
    })
    .await
    .map_err(|e| HttpError::Internal(format!("enrollment task: {e}")))?;
    match result {
        (Ok(e), _) => {
            eprintln!(
                "idhal serve: {} {} ({}, project {}) for {remote}",
                if e.fresh {
                    "enrolled"
                } else {
                    "re-sent enrollment of"
                },
                e.node,
                e.address,
                e.project
            );
            Ok(Reply::ok(
                enroll::CONTENT_TYPE,
                ReplyBody::bytes(e.response),
            ))
        }
        (Err(r), body) => {
            let token = enroll::Request::parse(&body)
                .map(|s| s.request.token.to_string())
                .unwrap_or_else(|_| "-".into());
            eprintln!("idhal serve: enrollment refused for {remote} (token {token}): {r}");
            if let Refusal::Internal(detail) = &r {
                return Err(HttpError::Internal(detail.clone()));
            }
            Err(HttpError::Refused {
                status: r.status(),
                message: r.to_string(),
            })
        }
    }
}

/// `POST /peers`: like enrollment, on a blocking thread (the PostgreSQL client blocks) and
/// never cancelled half way.
async fn registration(
    service: Arc<Peers>,
    body: Bytes,
    remote: SocketAddr,
) -> Result<Reply, HttpError> {
    let result = tokio::task::spawn_blocking(move || {
        let result = service.register(&body, idhal_manifest::time::now());
        (result, body)
    })
    .await
    .map_err(|e| HttpError::Internal(format!("peers task: {e}")))?;
    match result {
        (Ok(r), _) => {
            for why in &r.skipped {
                eprintln!(
                    "idhal serve: left out of {}'s peer list (fix or revoke the node): {why}",
                    r.node
                );
            }
            eprintln!(
                "idhal serve: registered the WireGuard key {} of {} ({} endpoint(s), project {}, {} peer(s) listed) for {remote}",
                r.wg_key, r.node, r.endpoints, r.project, r.peers
            );
            Ok(Reply::ok(peers::CONTENT_TYPE, ReplyBody::bytes(r.response)))
        }
        (Err(r), body) => {
            let node = peers::Request::parse(&body)
                .map(|s| s.request.node)
                .unwrap_or_else(|_| "-".into());
            let held = match &r {
                peers_service::Refusal::KeyInUse { holder } => format!(" (held by {holder})"),
                _ => String::new(),
            };
            eprintln!(
                "idhal serve: peer registration refused for {remote} (node {node}): {r}{held}"
            );
            if let peers_service::Refusal::Internal(detail) = &r {
                return Err(HttpError::Internal(detail.clone()));
            }
            Err(HttpError::Refused {
                status: r.status(),
                message: r.to_string(),
            })
        }
    }
}

/// `POST /renew`: like enrollment, on a blocking thread and never cancelled half way. One log
/// line per renewal, and per refusal.
async fn renewal(
    service: Arc<Renewer>,
    body: Bytes,
    remote: SocketAddr,
) -> Result<Reply, HttpError> {
    let result = tokio::task::spawn_blocking(move || {
        let result = service.renew(&body, idhal_manifest::time::now());
        (result, body)
    })
    .await
    .map_err(|e| HttpError::Internal(format!("renewal task: {e}")))?;
    match result {
        (Ok(r), _) => {
            let until = idhal_manifest::time::rfc3339(r.not_after);
            if r.fresh {
                eprintln!(
                    "idhal serve: renewed the certificate of {} (project {}): serial {}, valid until {until}, for {remote}",
                    r.node, r.project, r.serial
                );
            } else {
                eprintln!(
                    "idhal serve: re-sent the certificate of {} (project {}): serial {}, valid until {until}, issued within [ca] renew_min_interval, for {remote}",
                    r.node, r.project, r.serial
                );
            }
            Ok(Reply::ok(renew::CONTENT_TYPE, ReplyBody::bytes(r.response)))
        }
        (Err(r), body) => {
            let node = renew::Request::parse(&body)
                .map(|s| s.request.node.to_string())
                .unwrap_or_else(|_| "-".into());
            eprintln!("idhal serve: renewal refused for {remote} (node {node}): {r}");
            if let renew_service::Refusal::Internal(detail) = &r {
                return Err(HttpError::Internal(detail.clone()));
            }
            Err(HttpError::Refused {
                status: r.status(),
                message: r.to_string(),
            })
        }
    }
}

/// Decodes %XX escapes; `None` for a malformed escape.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Serves the regular files under a root: GET and HEAD only, no listings, no hidden files, and
/// nothing outside the root, whether by `..`, encoded dots or a symlink pointing out.
pub(crate) struct StaticFiles {
    root: PathBuf,
}

impl StaticFiles {
    pub(crate) fn new(root: &Path) -> io::Result<StaticFiles> {
        let root = root.canonicalize()?;
        if !root.is_dir() {
            return Err(io::Error::other(format!(
                "{} is not a directory",
                root.display()
            )));
        }
        Ok(StaticFiles { root })
    }

    /// Maps a URL path to a file under the root, or `NotFound` for anything that must not be
    /// served. Refusals are all 404 so probing learns nothing about the tree.
    pub(crate) fn resolve(&self, path: &str) -> Result<PathBuf, HttpError> {
        let decoded = percent_decode(path)
            .ok_or_else(|| HttpError::BadRequest("malformed %-escape".into()))?;
        let decoded = String::from_utf8(decoded).map_err(|_| HttpError::NotFound)?;
        if decoded.contains('\0') {
            return Err(HttpError::BadRequest("NUL in path".into()));
        }
        let segments: Vec<&str> = decoded.split('/').filter(|s| !s.is_empty()).collect();
        // A leading dot covers `.`, `..` and hidden files (lock files, temp files) alike.
        if segments.is_empty() || segments.iter().any(|s| s.starts_with('.')) {
            return Err(HttpError::NotFound);
        }
        let candidate = segments
            .iter()
            .fold(self.root.clone(), |p, segment| p.join(segment));
        let real = candidate.canonicalize().map_err(|_| HttpError::NotFound)?;
        // Symlinks may point anywhere; only what really lies under the root (and is not hidden
        // once resolved) is served.
        let inside = real
            .strip_prefix(&self.root)
            .map_err(|_| HttpError::NotFound)?;
        let hidden = inside.components().any(|c| match c {
            Component::Normal(n) => n.to_string_lossy().starts_with('.'),
            _ => true,
        });
        if hidden {
            return Err(HttpError::NotFound);
        }
        Ok(real)
    }
}

impl StaticFiles {
    /// Finds and opens the file for `path` and answers with it. Path checks, open and a small
    /// file's read run on the runtime thread: see [`Source::File`] for why.
    fn serve(&self, path: &str) -> Result<Reply, HttpError> {
        let real = self.resolve(path)?;
        let (body, name) = open_regular(&real)?;
        let content_type = if name.ends_with(".minisig") || name.ends_with(".pub") {
            "text/plain; charset=utf-8"
        } else {
            "application/octet-stream"
        };
        Ok(Reply::ok(content_type, body))
    }
}

/// Opens a resolved path; length and type come from the opened file, not the path: they
/// describe what is sent. A file of at most one chunk (signatures, keys, most manifests) is read
/// at once; a larger one is streamed from the open file.
fn open_regular(real: &Path) -> Result<(ReplyBody, String), HttpError> {
    let internal = |e: io::Error| HttpError::Internal(format!("{}: {e}", real.display()));
    let mut file = match std::fs::File::open(real) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(HttpError::NotFound),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Err(HttpError::NotFound),
        Err(e) => return Err(internal(e)),
    };
    let meta = file.metadata().map_err(internal)?;
    if !meta.is_file() {
        return Err(HttpError::NotFound);
    }
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let len = meta.len();
    if len > FILE_CHUNK as u64 {
        return Ok((ReplyBody::file(file, len), name));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    io::Read::by_ref(&mut file)
        .take(len)
        .read_to_end(&mut bytes)
        .map_err(internal)?;
    if bytes.len() as u64 != len {
        return Err(internal(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the file shrank while being read",
        )));
    }
    Ok((ReplyBody::bytes(bytes), name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(percent_decode("/a%2e%2E/b").unwrap(), b"/a../b");
        assert!(percent_decode("/a%2").is_none());
        assert!(percent_decode("/a%zz").is_none());
    }

    #[test]
    fn resolve_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("manifests")).unwrap();
        std::fs::write(root.join("manifest"), b"m").unwrap();
        std::fs::write(root.join("manifests/1"), b"1").unwrap();
        std::fs::write(root.join(".lock"), b"").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("out")).unwrap();
        std::os::unix::fs::symlink(root.join("manifest"), root.join("in")).unwrap();
        let s = StaticFiles::new(&root).unwrap();
        assert!(s.resolve("/manifest").is_ok());
        assert!(s.resolve("//manifests//1").is_ok());
        assert!(s.resolve("/in").is_ok());
        for bad in [
            "/",
            "/../secret",
            "/%2e%2e/secret",
            "/manifests/%2E%2E/%2E%2E/secret",
            "/manifests/..%2f..%2fsecret",
            "/.lock",
            "/out",
            "/missing",
        ] {
            assert!(matches!(s.resolve(bad), Err(HttpError::NotFound)), "{bad}");
        }
        assert!(matches!(
            s.resolve("/manifest%00"),
            Err(HttpError::BadRequest(why)) if why == "NUL in path"
        ));
    }
}
