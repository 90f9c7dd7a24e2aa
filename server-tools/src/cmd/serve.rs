//! `idhal serve`: the embedded HTTP server. Binds, announces the real address on stdout, then
//! runs the HTTP front (`crate::http`) over PUBDIR's files and, when --state-dir holds a CA,
//! `POST /enroll`, until SIGTERM or SIGINT.

use crate::ca::crl;
use crate::ca::db::Open;
use crate::ca::enroll::Enroller;
use crate::ca::peers::Peers;
use crate::ca::renew::Renewer;
use crate::ca::state;
use crate::cmd::{load_config, Exit, Global};
use crate::http::routes::App;
use crate::http::{fit_open_files, OpenFiles, StaticFiles, Stopped};
use anyhow::Context;
use idhal_manifest::paths;
use idhal_manifest::{enroll, peers, renew};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

/// Serve PUBDIR over HTTP.
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Serve the files of PUBDIR over plain HTTP: the embedded default, any static web \
        server can serve PUBDIR too (send `Cache-Control: no-cache` for manifest.minisig).\n\n\
        Only GET and HEAD; only regular files under PUBDIR; no directory listings, no hidden files \
        (lock and temp files), nothing outside PUBDIR (`..`, encoded dots and symlinks pointing out \
        are all 404). Every response has Content-Length and Cache-Control: no-cache.\n\n\
        With a CA in --state-dir (`idhal ca init`), `POST /enroll` (exactly that path) answers \
        enrollment requests, `POST /renew` gives enrolled nodes a new certificate before theirs \
        expires ([ca] node_cert_validity, renew_min_interval; docs/enrollment.md), and \
        `POST /peers` lets enrolled nodes register their WireGuard key \
        and endpoints and get their project's peer list ([peers] sets the timings it carries; \
        docs/direct-paths.md). Peer requests are at most 4 KiB, renewal requests 1 KiB (larger: \
        413 before reading).\n\n\
        On start it prints one line, `listening on http://ADDR`, with the address actually bound \
        (useful with port 0). One access log line per request goes to stderr.\n\n\
        Limits ([limits.http] in --config, defaults in docs/server-config.md): at most 4096 \
        connections (then a short wait, then 503), request bodies of at most 8 KiB (a larger \
        Content-Length gets 413 before anything is read), 10 s for a request head or body, 5 s \
        for a connection that sends nothing, 30 s for a client that stops reading. SIGTERM or \
        SIGINT stops accepting, lets requests in flight (enrollments) finish within \
        shutdown_grace_ms, and exits 0.\n\n\
        Put a TLS reverse proxy in front, or rely on the signatures: agents verify everything they \
        fetch, so plain HTTP cannot make them run anything unsigned.",
    after_help = "Examples:\n  \
        idhal serve --root /srv/idhal\n  \
        idhal serve --root /srv/idhal --listen 10.0.2.100:8080\n  \
        idhal --state-dir /var/lib/idhal-server --config /etc/idhal/server.toml serve --root /srv/idhal"
)]
pub struct Args {
    /// Directory to serve (the --out of `idhal sign`).
    #[arg(long, value_name = "PUBDIR")]
    pub root: PathBuf,
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Threads of the async runtime that answers requests (enrollments run on extra blocking
    /// threads). Connections are not tied to threads: see [limits.http] for their limits.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<Exit> {
    let cfg = match load_config(global) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let files = StaticFiles::new(&args.root)
        .with_context(|| format!("cannot serve {}", args.root.display()))?;
    if !args.root.join(paths::SIGNATURE).is_file() {
        eprintln!(
            "idhal serve: warning: {} has no {} yet: agents will get 404 until `idhal sign --out {}` runs",
            args.root.display(),
            paths::SIGNATURE,
            args.root.display()
        );
    }
    let enroller = if state::configured(&cfg, &global.state_dir) {
        // Opened here, before the async runtime starts: the PostgreSQL client blocks.
        let projects: Vec<String> = state::open(&cfg, &global.state_dir, Open::Existing)?
            .projects()?
            .into_iter()
            .map(|p| p.name)
            .collect();
        eprintln!(
            "idhal serve: enrollment on POST /{}, renewal on POST /{}, WireGuard peers on POST /{} for project(s) {} (state {})",
            enroll::PATH,
            renew::PATH,
            peers::PATH,
            projects.join(", "),
            state::describe(&cfg, &global.state_dir)
        );
        crl::spawn_refresher(global.state_dir.clone(), cfg.clone())
            .context("cannot start the CRL refresh thread")?;
        Some(Arc::new(Enroller::new(&global.state_dir, cfg.clone())))
    } else {
        eprintln!(
            "idhal serve: no state database in {}: enrollment is off (`idhal ca init` turns it on)",
            global.state_dir.display()
        );
        None
    };
    let mut limits = cfg.limits.http.clone();
    if let OpenFiles::Short { soft, fits } = fit_open_files(limits.max_connections) {
        eprintln!(
            "idhal serve: warning: the open-file limit is {soft}: serving at most {fits} connections \
             instead of [limits.http] max_connections = {} (raise LimitNOFILE)",
            limits.max_connections
        );
        limits.max_connections = fits;
    }
    let app = Arc::new(App {
        files,
        peers: enroller.clone().map(|e| Arc::new(Peers::new(e))),
        renew: enroller.clone().map(|e| Arc::new(Renewer::new(e))),
        enroller,
        limits,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.threads))
        .thread_name("http")
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")?;
    let stopped = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen.as_str())
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr().context("the listening address")?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{addr}").context("cannot write to stdout")?;
        out.flush().context("cannot write to stdout")?;
        drop(out);
        crate::http::serve(listener, app)
            .await
            .context("cannot install the SIGTERM/SIGINT handlers")
    })?;
    // Dropping the runtime waits for enrollments still running on blocking threads: each ends
    // with its transaction committed or rolled back, never half written.
    drop(runtime);
    match stopped {
        Stopped::Signal => {
            eprintln!("idhal serve: stopped");
            Ok(Exit::Ok)
        }
        Stopped::GraceExpired { unfinished } => {
            eprintln!(
                "idhal serve: stopped; {unfinished} connection(s) still busy after [limits.http] \
                 shutdown_grace_ms were cut"
            );
            Ok(Exit::Ok)
        }
    }
}
