//! Benchmarks that print figures (never timed assertions): `idhal sign` and `idhal verify` on a
//! 1 MiB manifest of 200 scriptlets. Run with
//! `cargo test --release -p idhal-server-tools --test sign_bench -- --ignored --nocapture`.

mod cli_support;

use cli_support::*;
use std::time::{Duration, Instant};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
#[ignore = "benchmark: prints figures"]
fn bench_sign_and_verify_200_scriptlets_1mib() {
    let f = Fixture::new();
    std::fs::remove_file(f.scripts.join("000-a.sh")).unwrap();
    for n in 0..200 {
        let body = format!("#!/bin/sh\n# idhal: frequency=once\n{}\n", "#".repeat(5200));
        write(&f.scripts, &format!("{n:03}-step.sh"), &body);
    }
    let (mut sign_times, mut verify_times) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        let t = Instant::now();
        f.sign(&[]).ok();
        sign_times.push(t.elapsed());
        let t = Instant::now();
        idhal_run(&["verify", "--pub", s(&f.pk), s(&f.pubdir)]).ok();
        verify_times.push(t.elapsed());
    }
    let size = std::fs::metadata(f.pubdir.join("manifest")).unwrap().len();
    println!(
        "idhal sign: {size} bytes, 200 scriptlets: median {:?} per run (process start to exit, incl. 5 fsynced files)",
        median(sign_times)
    );
    println!("idhal verify: median {:?} per run", median(verify_times));
}
