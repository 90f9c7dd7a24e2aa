//! `idhal serve`: the embedded HTTP server. Binds, announces the real address on stdout, then runs
//! a few worker threads over the router (static PUBDIR files today; enrollment joins it later).

use crate::router::{Router, StaticFiles};
use crate::Global;
use anyhow::Context;
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

pub fn run(args: Args, _global: &Global) -> anyhow::Result<ExitCode> {
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
    let router = Arc::new(Router::default().mount("/", files));
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
