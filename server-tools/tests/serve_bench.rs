//! Benchmark that prints figures (never timed assertions): `idhal serve` requests per second on
//! loopback, HTTP/1.0 (one connection per request, like the agent), for a bounded 3 seconds per
//! file: the signature and a 1 MiB manifest. Run with
//! `cargo test --release -p idhal-server-tools --test serve_bench -- --ignored --nocapture`.

mod cli_support;

use cli_support::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
#[ignore = "benchmark: prints figures"]
fn bench_serve_loopback() {
    let f = Fixture::new();
    write(&f.scripts, "010-big.sh", &"#".repeat(1 << 20));
    f.sign(&[]).ok();
    let server = Server::start(&f.pubdir);
    let addr = server.addr;
    for (target, clients) in [("/manifest.minisig", 4), ("/manifests/1", 4)] {
        let count = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs(3);
        let started = Instant::now();
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                let count = Arc::clone(&count);
                std::thread::spawn(move || {
                    while Instant::now() < deadline {
                        assert_eq!(get(addr, target).status, 200);
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        let n = count.load(Ordering::Relaxed);
        let secs = started.elapsed().as_secs_f64();
        let size = std::fs::metadata(f.pubdir.join(&target[1..]))
            .unwrap()
            .len();
        println!(
            "idhal serve: GET {target} ({size} bytes): {n} requests in {secs:.1} s with {clients} \
             clients = {:.0} req/s, {:.0} MiB/s",
            n as f64 / secs,
            (n * size) as f64 / secs / f64::from(1 << 20)
        );
    }
    drop(server.stop());
}
