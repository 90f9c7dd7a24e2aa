//! `idhal serve`: the embedded HTTP server. Binds, announces the real address on stdout, then
//! runs the HTTP front (`crate::http`) over PUBDIR's files and, when --state-dir holds a CA,
//! `POST /enroll`, until SIGTERM or SIGINT.

use crate::ca::db::{Db, Open};
use crate::ca::enroll::Enroller;
use crate::cmd::{load_config, Exit, Global};
use crate::config::{CaSection, ServerConfig};
use crate::http::routes::App;
use crate::http::{StaticFiles, Stopped};
use anyhow::Context;
use idhal_manifest::enroll;
use idhal_manifest::paths;
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
        enrollment requests.\n\n\
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
    let enroller = if Db::exists(&global.state_dir) {
        let projects: Vec<String> = Db::open(&global.state_dir, Open::Existing)?
            .projects()?
            .into_iter()
            .map(|p| p.name)
            .collect();
        eprintln!(
            "idhal serve: enrollment on POST /{} for project(s) {} (state {})",
            enroll::PATH,
            projects.join(", "),
            global.state_dir.display()
        );
        spawn_crl_refresher(global.state_dir.clone(), cfg.clone())?;
        Some(Arc::new(Enroller::new(&global.state_dir, cfg.clone())))
    } else {
        eprintln!(
            "idhal serve: no state database in {}: enrollment is off (`idhal ca init` turns it on)",
            global.state_dir.display()
        );
        None
    };
    let mut limits = cfg.limits.http.clone();
    limits.max_connections = fit_open_files(limits.max_connections);
    let app = Arc::new(App {
        files,
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

/// Raises the soft open-file limit so `max_connections` sockets fit (plus files and the state
/// database); when the hard limit is lower, serves fewer connections and says so.
fn fit_open_files(max_connections: u32) -> u32 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    const RESERVED: u64 = 64;
    let want = u64::from(max_connections) + RESERVED;
    let mut limit = getrlimit(Resource::Nofile);
    let soft = limit.current.unwrap_or(u64::MAX);
    if soft >= want {
        return max_connections;
    }
    let hard = limit.maximum.unwrap_or(u64::MAX);
    limit.current = Some(want.min(hard));
    let soft = match setrlimit(Resource::Nofile, limit) {
        Ok(()) => want.min(hard),
        Err(_) => soft,
    };
    if soft >= want {
        return max_connections;
    }
    let fits = u32::try_from(soft.saturating_sub(RESERVED).max(1)).unwrap_or(u32::MAX);
    eprintln!(
        "idhal serve: warning: the open-file limit is {soft}: serving at most {fits} connections \
         instead of [limits.http] max_connections = {max_connections} (raise LimitNOFILE)"
    );
    fits
}

/// Re-signs due CRLs in the background, checking every tenth of their validity (at most
/// hourly), so a server left running never lets a CRL expire.
fn spawn_crl_refresher(state_dir: PathBuf, cfg: ServerConfig) -> anyhow::Result<()> {
    let every = (CaSection::secs(&cfg.ca.crl_validity) / 10).clamp(1, 3600);
    std::thread::Builder::new()
        .name("crl-refresh".into())
        .spawn(move || loop {
            let result = Db::open(&state_dir, Open::Existing)
                .map_err(anyhow::Error::from)
                .and_then(|mut db| {
                    crate::ca::crl::refresh_due(
                        &mut db,
                        &state_dir,
                        &cfg,
                        idhal_manifest::time::now(),
                        false,
                    )
                });
            match result {
                Ok(done) => {
                    for (project, next) in done {
                        if let Some(next) = next {
                            eprintln!(
                                "idhal serve: CRL of project {project} re-signed, valid until {}",
                                idhal_manifest::time::rfc3339(next)
                            );
                        }
                    }
                }
                Err(e) => eprintln!("idhal serve: error: CRL refresh: {e:#}"),
            }
            std::thread::sleep(std::time::Duration::from_secs(every));
        })
        .context("cannot start the CRL refresh thread")?;
    Ok(())
}
