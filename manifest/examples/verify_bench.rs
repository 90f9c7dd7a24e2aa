//! Times verification alone (no network, no process start): `cargo run --release -p
//! idhal-manifest --example verify_bench -- PUBKEY MANIFEST SIGNATURE`. Used by scripts/bench.sh.
use idhal_manifest::{verify, Expiry, Policy, PublicKey};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [key, manifest, sig] = &args[..] else {
        eprintln!("usage: verify_bench PUBKEY MANIFEST SIGNATURE");
        std::process::exit(2);
    };
    let key = PublicKey::parse(&std::fs::read_to_string(key).unwrap()).unwrap();
    let bytes = std::fs::read(manifest).unwrap();
    let sig = std::fs::read_to_string(sig).unwrap();
    let policy = Policy {
        now: idhal_manifest::time::now(),
        expiry: Expiry::Enforce,
        last_serial: None,
    };
    let mut times = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let m = verify(&key, &bytes, &sig, &policy).unwrap();
        std::hint::black_box(&m);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "verify {} bytes: median {:.2} ms, min {:.2} ms (n={})",
        bytes.len(),
        times[times.len() / 2],
        times[0],
        times.len()
    );
}
