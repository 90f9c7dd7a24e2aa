//! `idhal serve`: the embedded HTTP server. Binds, announces the real address on stdout, then runs
//! a few worker threads over the router (PUBDIR's files, and `POST /enroll` when --state-dir holds a CA).

use crate::config::{CaSection, ServerConfig};
use crate::db::{Db, Open};
use crate::enroll::{EnrollHandler, Enroller};
use crate::router::{Router, StaticFiles};
use crate::Global;
use anyhow::Context;
use idhal_manifest::enroll;
use idhal_manifest::paths;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// Serve PUBDIR over HTTP.
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Serve the files of PUBDIR over plain HTTP: the embedded default, any static web \
        server can serve PUBDIR too (send `Cache-Control: no-cache` for manifest.minisig).\n\n\
        Only GET and HEAD; only regular files under PUBDIR; no directory listings, no hidden files \
        (lock and temp files), nothing outside PUBDIR (`..`, encoded dots and symlinks pointing out \
        are all 404). Every response has Content-Length and Cache-Control: no-cache.\n\n\
        On start it prints one line, `listening on http://ADDR`, with the address actually bound \
        (useful with port 0). One access log line per request goes to stderr.\n\n\
        Put a TLS reverse proxy in front, or rely on the signatures: agents verify everything they \
        fetch, so plain HTTP cannot make them run anything unsigned.",
    after_help = "Examples:\n  \
        idhal serve --root /srv/idhal\n  \
        idhal serve --root /srv/idhal --listen 10.0.2.100:8080 --threads 8"
)]
pub struct Args {
    /// Directory to serve (the --out of `idhal sign`).
    #[arg(long, value_name = "PUBDIR")]
    pub root: PathBuf,
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Worker threads answering requests. Each sends one response at a time, so this bounds how
    /// many slow clients can be served at once.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let cfg = match ServerConfig::load_or_exit(global.config.as_deref()) {
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
    let mut router = Router::default().mount("/", files);
    if Db::exists(&global.state_dir) {
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
        let enroller = Arc::new(Enroller::new(&global.state_dir, cfg.clone()));
        router = router.mount(&format!("/{}", enroll::PATH), EnrollHandler(enroller));
        spawn_crl_refresher(global.state_dir.clone(), cfg)?;
    } else {
        eprintln!(
            "idhal serve: no state database in {}: enrollment is off (`idhal ca init` turns it on)",
            global.state_dir.display()
        );
    }
    let router = Arc::new(router);
    let server = tiny_http::Server::http(args.listen.as_str())
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let addr = server
        .server_addr()
        .to_ip()
        .context("the server is not bound to an IP address")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on http://{addr}").context("cannot write to stdout")?;
    out.flush().context("cannot write to stdout")?;
    drop(out);

    let server = Arc::new(server);
    let workers: Vec<_> = (0..args.threads)
        .map(|n| {
            let (server, router) = (Arc::clone(&server), Arc::clone(&router));
            std::thread::Builder::new()
                .name(format!("http-{n}"))
                .spawn(move || loop {
                    match server.recv() {
                        Ok(request) => router.dispatch(request),
                        Err(e) => {
                            eprintln!("idhal serve: stopped accepting: {e}");
                            break;
                        }
                    }
                })
                .context("cannot start a worker thread")
        })
        .collect::<anyhow::Result<_>>()?;
    for w in workers {
        let _ = w.join();
    }
    Ok(ExitCode::SUCCESS)
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
                    crate::crl::refresh_due(
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
