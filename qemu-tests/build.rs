//! The harness library includes server-tools' test components (OAR on PostgreSQL, Knot) from
//! server-tools/tests/hook_support (src/cluster.rs; the cluster tests and `idhal-demo` use
//! them), which names the `idhal` binary at compile time through CARGO_BIN_EXE_idhal (set by
//! cargo only for server-tools' own tests). Point it at the release build the harness makes
//! (src/bins.rs); the VM tests themselves use `Shared::idhal`.
use std::path::PathBuf;

fn main() {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out.
        None => PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"))
            .ancestors()
            .nth(4)
            .expect("target dir above OUT_DIR")
            .to_path_buf(),
    };
    println!(
        "cargo:rustc-env=CARGO_BIN_EXE_idhal={}",
        target.join("release/idhal").display()
    );
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
}
