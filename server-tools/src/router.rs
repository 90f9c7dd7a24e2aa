//! The HTTP side of `idhal serve`: a prefix router over tiny_http, the one place handler errors
//! become status codes, the access log, and the static-files handler for PUBDIR.

use std::fs::File;
use std::io::{self, Cursor, Read};
use std::path::{Component, Path, PathBuf};
use std::time::Instant;
use tiny_http::{Header, Method, Request, Response, StatusCode};

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
}

/// A response body: bytes in memory or an open file (already opened, so a concurrent rename in
/// PUBDIR cannot change what is sent mid-response).
pub(crate) enum Body {
    Bytes(Vec<u8>),
    File { file: File, len: u64 },
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Bytes(b) => b.len() as u64,
            Body::File { len, .. } => *len,
        }
    }
}

pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) content_type: &'static str,
    pub(crate) headers: Vec<(&'static str, String)>,
    pub(crate) body: Body,
}

impl Reply {
    pub(crate) fn ok(content_type: &'static str, body: Body) -> Reply {
        Reply {
            status: 200,
            content_type,
            headers: Vec::new(),
            body,
        }
    }
}

/// What a handler sees: the request (its body readable for POST handlers) and the path it was
/// routed on, query string removed, still percent-encoded.
pub(crate) trait Handler: Send + Sync {
    fn handle(&self, request: &mut Request, path: &str) -> Result<Reply, HttpError>;
}

/// Routes on the longest matching path prefix.
#[derive(Default)]
pub(crate) struct Router {
    routes: Vec<(String, Box<dyn Handler>)>,
}

impl Router {
    /// Adds a handler for every path starting with `prefix` (e.g. "/" or "/enroll/").
    pub(crate) fn mount(mut self, prefix: &str, handler: impl Handler + 'static) -> Router {
        self.routes.push((prefix.to_owned(), Box::new(handler)));
        self.routes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        self
    }

    fn route(&self, request: &mut Request) -> Result<Reply, HttpError> {
        let url = request.url().to_owned();
        let path = url.split(['?', '#']).next().unwrap_or("");
        if !path.starts_with('/') {
            return Err(HttpError::BadRequest("the path must start with /".into()));
        }
        let (_, handler) = self
            .routes
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_str()))
            .ok_or(HttpError::NotFound)?;
        handler.handle(request, path)
    }

    /// Answers one request and writes its access log line to stderr.
    pub(crate) fn dispatch(&self, mut request: Request) {
        let started = Instant::now();
        let reply = self.route(&mut request).unwrap_or_else(|e| {
            if let HttpError::Internal(detail) = &e {
                eprintln!("idhal serve: internal error on {}: {detail}", request.url());
            }
            let mut headers = Vec::new();
            if let HttpError::MethodNotAllowed { allow } = &e {
                headers.push(("Allow", (*allow).to_owned()));
            }
            Reply {
                status: e.status(),
                content_type: "text/plain; charset=utf-8",
                headers,
                body: Body::Bytes(e.public_message().into_bytes()),
            }
        });
        let (status, len) = (reply.status, reply.body.len());
        let remote = request
            .remote_addr()
            .map_or_else(|| "-".to_owned(), |a| a.to_string());
        let line = format!(
            "{remote} \"{} {}\" {status} {len} {}ms",
            request.method(),
            request.url().escape_debug(),
            started.elapsed().as_millis()
        );
        let result = match reply.body {
            Body::Bytes(b) => request.respond(response(
                reply.status,
                reply.content_type,
                &reply.headers,
                Cursor::new(b),
                len,
            )),
            Body::File { file, len } => request.respond(response(
                reply.status,
                reply.content_type,
                &reply.headers,
                file,
                len,
            )),
        };
        match result {
            Ok(()) => eprintln!("{line}"),
            Err(e) => eprintln!("{line} (send failed: {e})"),
        }
    }
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes())
        .expect("header names and values are ASCII")
}

fn response<R: Read>(
    status: u16,
    content_type: &str,
    extra: &[(&'static str, String)],
    body: R,
    len: u64,
) -> Response<R> {
    let mut headers = vec![
        header("Content-Type", content_type),
        // Clients must revalidate: a stale manifest.minisig would hide a new publication.
        header("Cache-Control", "no-cache"),
    ];
    headers.extend(extra.iter().map(|(n, v)| header(n, v)));
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    // Never chunked: Content-Length is always sent (the agent's HTTP/1.0 client relies on it).
    Response::new(StatusCode(status), headers, body, Some(len), None)
        .with_chunked_threshold(usize::MAX)
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

impl Handler for StaticFiles {
    fn handle(&self, request: &mut Request, path: &str) -> Result<Reply, HttpError> {
        if !matches!(request.method(), Method::Get | Method::Head) {
            return Err(HttpError::MethodNotAllowed { allow: "GET, HEAD" });
        }
        let real = self.resolve(path)?;
        let file = match File::open(&real) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(HttpError::NotFound),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(HttpError::NotFound)
            }
            Err(e) => return Err(HttpError::Internal(format!("{}: {e}", real.display()))),
        };
        // Length and type come from the opened file, not the path: they describe what is sent.
        let meta = file
            .metadata()
            .map_err(|e| HttpError::Internal(format!("{}: {e}", real.display())))?;
        if !meta.is_file() {
            return Err(HttpError::NotFound);
        }
        let name = real
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        let content_type = if name.ends_with(".minisig") || name.ends_with(".pub") {
            "text/plain; charset=utf-8"
        } else {
            "application/octet-stream"
        };
        Ok(Reply::ok(
            content_type,
            Body::File {
                file,
                len: meta.len(),
            },
        ))
    }
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
            "/manifest%00",
        ] {
            assert!(s.resolve(bad).is_err(), "{bad}");
        }
    }
}
