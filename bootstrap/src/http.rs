//! A deliberately small HTTP client for two jobs: GET a static file, and POST one enrollment
//! request, each with a hard deadline and a size cap enforced while reading. It speaks HTTP/1.0
//! (`Connection: close`), so servers answer with Content-Length or close-delimited bodies and
//! never chunked encoding; httparse parses the response head. With the `https` feature the same
//! code runs over rustls, trusting only the configured CA bundle.

use crate::config::Limits;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// Always starts with `/`.
    pub path: String,
}

impl Url {
    pub fn parse(s: &str) -> Result<Url, String> {
        let bad = |why: &str| format!("invalid URL {s:?}: {why}");
        let (scheme, rest, default_port) = if let Some(r) = s.strip_prefix("http://") {
            (Scheme::Http, r, 80)
        } else if let Some(r) = s.strip_prefix("https://") {
            (Scheme::Https, r, 443)
        } else {
            return Err(bad("expected http:// or https://"));
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, p) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            (h, p.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad("bad port"))?,
            None => default_port,
        };
        let host_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':');
        if host.is_empty() || !host.chars().all(host_ok) {
            return Err(bad("bad host"));
        }
        if path.bytes().any(|b| b <= b' ' || b >= 0x7f) {
            return Err(bad("bad path"));
        }
        Ok(Url {
            scheme,
            host: host.to_owned(),
            port,
            path: if path.is_empty() {
                "/".into()
            } else {
                path.into()
            },
        })
    }

    /// `rel` resolved against this URL taken as a directory (`http://h/idhal` + `manifest` →
    /// `http://h/idhal/manifest`).
    pub fn join(&self, rel: &str) -> Url {
        let mut u = self.clone();
        if !u.path.ends_with('/') {
            u.path.push('/');
        }
        u.path.push_str(rel);
        u
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}{}", self.host, self.port, self.path)
        } else {
            write!(f, "{scheme}://{}:{}{}", self.host, self.port, self.path)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    #[error("timed out (deadline {}s)", .0.as_secs())]
    Timeout(Duration),
    #[error("I/O error: {0}")]
    Io(io::Error),
    /// The status and the first line of the body (servers explain refusals there).
    #[error("server answered HTTP {code}{}", if reason.is_empty() { String::new() } else { format!(": {reason}") })]
    Status { code: u16, reason: String },
    #[error("response larger than the {limit}-byte limit")]
    TooLarge { limit: usize },
    #[error("response truncated: got {got} of {expected} bytes")]
    Truncated { got: usize, expected: usize },
    #[error("malformed response: {0}")]
    BadResponse(String),
    #[error("TLS: {0}")]
    Tls(String),
}

impl HttpError {
    /// Worth retrying: the server or network may do better next time. A refusal by policy
    /// (too large, malformed, TLS trust) is final.
    pub fn is_transient(&self) -> bool {
        match self {
            HttpError::Connect(_)
            | HttpError::Timeout(_)
            | HttpError::Io(_)
            | HttpError::Truncated { .. } => true,
            HttpError::Status { code, .. } => *code >= 500 || matches!(code, 404 | 408 | 429),
            _ => false,
        }
    }

    /// For a POST: a 404 is final too (a missing endpoint does not appear by waiting, unlike a
    /// manifest being published).
    pub fn is_transient_post(&self) -> bool {
        !matches!(self, HttpError::Status { code: 404, .. }) && self.is_transient()
    }
}

/// What to send: a GET, or a POST with its content type and body.
#[derive(Clone, Copy)]
pub enum Method<'a> {
    Get,
    Post {
        content_type: &'a str,
        body: &'a [u8],
    },
}

/// How much of an error response's body is read for its first line.
const ERROR_BODY: usize = 1024;

/// The first line of an error body, printable ASCII only and bounded: it ends up in one log line.
fn reason_line(body: &[u8]) -> String {
    let line = body.split(|&b| b == b'\n').next().unwrap_or_default();
    line.iter()
        .filter(|b| (0x20..0x7f).contains(*b))
        .take(200)
        .map(|&b| b as char)
        .collect::<String>()
        .trim()
        .to_owned()
}

/// A TCP stream whose every read and write is bounded by one overall deadline.
struct DeadlineStream {
    tcp: TcpStream,
    deadline: Instant,
}

impl DeadlineStream {
    fn remaining(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
        } else {
            Ok(left)
        }
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.tcp.set_read_timeout(Some(self.remaining()?))?;
        self.tcp.read(buf)
    }
}

impl Write for DeadlineStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tcp.set_write_timeout(Some(self.remaining()?))?;
        self.tcp.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// Trust settings for HTTPS (the `https` feature).
#[derive(Clone, Default)]
pub struct Tls {
    #[cfg(feature = "https")]
    pub config: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl Tls {
    /// Trust exactly the CA certificates in `bundle` (PEM), nothing else.
    #[cfg(feature = "https")]
    pub fn from_bundle(bundle: &std::path::Path) -> Result<Tls, String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::CertificateDer;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(bundle)
            .map_err(|e| format!("{}: {e}", bundle.display()))?
        {
            let cert = cert.map_err(|e| format!("{}: {e}", bundle.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", bundle.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("{}: no certificates", bundle.display()));
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Tls {
            config: Some(std::sync::Arc::new(config)),
        })
    }
}

fn map_io(e: io::Error, timeout: Duration) -> HttpError {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => HttpError::Timeout(timeout),
        _ => HttpError::Io(e),
    }
}

fn connect(url: &Url, limits: &Limits, deadline: Instant) -> Result<DeadlineStream, HttpError> {
    let addrs = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(HttpError::Connect)?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "host has no address");
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HttpError::Timeout(limits.request_timeout));
        }
        match TcpStream::connect_timeout(&addr, left.min(limits.connect_timeout)) {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                return Ok(DeadlineStream { tcp, deadline });
            }
            Err(e) => last = e,
        }
    }
    Err(match last.kind() {
        io::ErrorKind::TimedOut => HttpError::Timeout(limits.connect_timeout),
        _ => HttpError::Connect(last),
    })
}

/// GETs `url` and returns its body, refusing anything over `limit` bytes.
pub fn get(url: &Url, limit: usize, limits: &Limits, tls: &Tls) -> Result<Vec<u8>, HttpError> {
    request(url, Method::Get, limit, limits, tls)
}

/// Sends `method` to `url` and returns the body of a 200, refusing anything over `limit` bytes.
pub fn request(
    url: &Url,
    method: Method,
    limit: usize,
    limits: &Limits,
    tls: &Tls,
) -> Result<Vec<u8>, HttpError> {
    let deadline = Instant::now() + limits.request_timeout;
    let stream = connect(url, limits, deadline)?;
    match url.scheme {
        Scheme::Http => exchange(stream, url, method, limit, limits),
        #[cfg(feature = "https")]
        Scheme::Https => {
            let config = tls.config.clone().ok_or_else(|| {
                HttpError::Tls("https:// needs ca_bundle in bootstrap.conf".into())
            })?;
            let name = rustls_pki_types::ServerName::try_from(url.host.clone())
                .map_err(|e| HttpError::Tls(e.to_string()))?;
            let conn = rustls::ClientConnection::new(config, name)
                .map_err(|e| HttpError::Tls(e.to_string()))?;
            exchange(
                rustls::StreamOwned::new(conn, stream),
                url,
                method,
                limit,
                limits,
            )
        }
        #[cfg(not(feature = "https"))]
        Scheme::Https => {
            let _ = tls;
            Err(HttpError::Tls(
                "this idhal-bootstrap was built without the https feature".into(),
            ))
        }
    }
}

fn exchange<S: Read + Write>(
    mut s: S,
    url: &Url,
    method: Method,
    limit: usize,
    limits: &Limits,
) -> Result<Vec<u8>, HttpError> {
    let t = limits.request_timeout;
    let host = if url.host.contains(':') {
        format!("[{}]", url.host)
    } else {
        url.host.clone()
    };
    let (verb, extra, body) = match method {
        Method::Get => ("GET", String::new(), &[][..]),
        Method::Post { content_type, body } => (
            "POST",
            format!(
                "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
                body.len()
            ),
            body,
        ),
    };
    let mut request = format!(
        "{verb} {} HTTP/1.0\r\nHost: {host}:{}\r\nUser-Agent: idhal-bootstrap/{}\r\nAccept: */*\r\nConnection: close\r\n{extra}\r\n",
        url.path,
        url.port,
        env!("CARGO_PKG_VERSION")
    )
    .into_bytes();
    request.extend_from_slice(body);
    s.write_all(&request)
        .and_then(|_| s.flush())
        .map_err(|e| tls_or_io(e, t))?;

    // Read the head (bounded), then parse it.
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 64 << 10];
    let (status, content_length, head_len) = loop {
        let n = s.read(&mut chunk).map_err(|e| tls_or_io(e, t))?;
        if n == 0 {
            return Err(HttpError::BadResponse(
                "connection closed before the response head".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let mut content_length = None;
                for h in resp.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        let v = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .ok_or_else(|| HttpError::BadResponse("bad Content-Length".into()))?;
                        content_length = Some(v);
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        return Err(HttpError::BadResponse(
                            "Transfer-Encoding in an HTTP/1.0 exchange".into(),
                        ));
                    }
                }
                break (resp.code.unwrap_or(0), content_length, len);
            }
            Ok(httparse::Status::Partial) if buf.len() < 16 << 10 => continue,
            Ok(httparse::Status::Partial) => {
                return Err(HttpError::BadResponse("response head too large".into()))
            }
            Err(e) => return Err(HttpError::BadResponse(e.to_string())),
        }
    };
    // An error's body is read only for its first line: bounded, and best effort.
    let ok = status == 200;
    let cap = if ok { limit } else { ERROR_BODY };
    if ok && content_length.is_some_and(|n| n > limit) {
        return Err(HttpError::TooLarge { limit });
    }
    let mut body = Vec::new();
    body.reserve_exact(content_length.unwrap_or(buf.len() - head_len).min(cap));
    body.extend_from_slice(&buf[head_len..]);
    drop(buf);
    loop {
        if body.len() > cap {
            if ok {
                return Err(HttpError::TooLarge { limit });
            }
            break;
        }
        if content_length.is_some_and(|n| body.len() >= n) {
            break;
        }
        let n = match s.read(&mut chunk) {
            Ok(n) => n,
            Err(_) if !ok => break,
            // A TLS peer that closes without close_notify after a complete Content-Length
            // body is handled by the `>= n` check above; anything else is an error.
            Err(e) => return Err(tls_or_io(e, t)),
        };
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    if !ok {
        return Err(HttpError::Status {
            code: status,
            reason: reason_line(&body),
        });
    }
    match content_length {
        Some(n) if body.len() < n => Err(HttpError::Truncated {
            got: body.len(),
            expected: n,
        }),
        Some(n) => {
            body.truncate(n);
            Ok(body)
        }
        None => Ok(body),
    }
}

fn tls_or_io(e: io::Error, timeout: Duration) -> HttpError {
    if e.kind() == io::ErrorKind::InvalidData {
        // rustls reports certificate and protocol failures as InvalidData.
        return HttpError::Tls(e.to_string());
    }
    map_io(e, timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("http://10.0.2.100:8080/idhal").unwrap();
        assert_eq!(
            u.join("manifest").to_string(),
            "http://10.0.2.100:8080/idhal/manifest"
        );
        let u = Url::parse("https://srv.example").unwrap();
        assert_eq!((u.port, u.path.as_str()), (443, "/"));
        assert_eq!(u.join("manifests/3").path, "/manifests/3");
        let u = Url::parse("http://[::1]:81/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 81));
        assert_eq!(u.to_string(), "http://[::1]:81/");
        for (bad, why) in [
            ("ftp://x", "expected http:// or https://"),
            ("http://", "bad host"),
            ("http://a b/", "bad host"),
            ("http://h:99999/", "bad port"),
            ("http://[::1/", "unclosed ["),
            ("http://h/\r\nX: y", "bad path"),
        ] {
            assert_eq!(
                Url::parse(bad),
                Err(format!("invalid URL {bad:?}: {why}")),
                "{bad}"
            );
        }
    }

    #[test]
    fn what_is_retried_and_what_is_shown() {
        let status = |code| HttpError::Status {
            code,
            reason: String::new(),
        };
        for (code, get, post) in [(404, true, false), (503, true, true), (429, true, true)] {
            assert_eq!(status(code).is_transient(), get, "{code}");
            assert_eq!(status(code).is_transient_post(), post, "{code}");
        }
        for code in [400, 401, 403, 409, 410, 422] {
            assert!(!status(code).is_transient_post(), "{code}");
        }
        assert_eq!(status(503).to_string(), "server answered HTTP 503");
        let refused = HttpError::Status {
            code: 409,
            reason: "token used up".into(),
        };
        assert_eq!(
            refused.to_string(),
            "server answered HTTP 409: token used up"
        );
        assert_eq!(reason_line(b"token used up\nmore"), "token used up");
        assert_eq!(reason_line(b"\x1b[31mred\r\n"), "[31mred");
    }
}
