//! Benchmark that prints figures (never timed assertions): enrollments per second through the
//! real `idhal serve` (HTTP/1.0, one connection per request like the agent; every enrollment a
//! durable SQLite transaction and a certificate). Requests are built before the
//! clock starts. Run with
//! `cargo test --release -p idhal-server-tools --test enroll_bench -- --ignored --nocapture`.

mod enroll_support;

use enroll_support::*;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[test]
#[ignore = "benchmark: prints figures"]
fn bench_enrollments_per_second() {
    const N: usize = 3000;
    let p = Project::new("");
    let server = p.serve();
    let token = p.token(&["--uses", "100000", "--ttl", "1h"]);
    let requests: Vec<Vec<u8>> = (0..N)
        .map(|_| request(&token, NodeKey::random().csr(), now()))
        .collect();
    // Each round enrolls its own third of the keys (a key enrolled again would be a cheap retry).
    let work = Arc::new(Mutex::new(requests));
    for clients in [1usize, 4, 8] {
        let latencies = Arc::new(Mutex::new(Vec::with_capacity(N)));
        let left = Arc::new(Mutex::new(N / 3));
        let started = Instant::now();
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                let (work, lat, left) = (work.clone(), latencies.clone(), left.clone());
                let addr = server.addr.clone();
                std::thread::spawn(move || loop {
                    {
                        let mut l = left.lock().unwrap();
                        if *l == 0 {
                            break;
                        }
                        *l -= 1;
                    }
                    let req = work.lock().unwrap().pop().unwrap();
                    let t = Instant::now();
                    let (status, _) = http(&addr, "POST", "/enroll", &req);
                    assert_eq!(status, 200);
                    lat.lock().unwrap().push(t.elapsed());
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let wall = started.elapsed();
        let mut lat = latencies.lock().unwrap().clone();
        lat.sort();
        let pct = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
        println!(
            "FIGURE enroll: {clients} client(s), {} enrollments in {:.2} s = {:.0}/s; latency p50 {:.2} ms, p99 {:.2} ms",
            lat.len(),
            wall.as_secs_f64(),
            lat.len() as f64 / wall.as_secs_f64(),
            pct(0.50).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3
        );
    }
}
