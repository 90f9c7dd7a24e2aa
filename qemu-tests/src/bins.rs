//! The binaries under test: the `idhal` server tools and the static musl agent, built with the
//! workspace's own cargo in release mode (what users run; the agent must be static to live in
//! the initramfs). `IDHAL_BIN` / `IDHAL_AGENT_BIN` point at prebuilt ones instead.
use std::path::PathBuf;
use std::process::Command;

const MUSL: &str = "x86_64-unknown-linux-musl";

pub fn workspace_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => workspace_dir().join("target"),
    }
}

/// Returns (idhal, agent). Release builds lock `target/release` and `target/<musl>/release`,
/// not the `target/debug` a running `cargo test` holds, so building from inside a test is safe.
pub fn build() -> Result<(PathBuf, PathBuf), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let run = |args: &[&str]| -> Result<(), String> {
        let st = Command::new(&cargo)
            .args(args)
            .current_dir(workspace_dir())
            .status()
            .map_err(|e| format!("running cargo: {e}"))?;
        if st.success() {
            Ok(())
        } else {
            Err(format!("cargo {} failed: {st}", args.join(" ")))
        }
    };
    let idhal = match std::env::var_os("IDHAL_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            run(&[
                "build",
                "-q",
                "--locked",
                "--release",
                "-p",
                "idhal-server-tools",
                "--bin",
                "idhal",
            ])?;
            target_dir().join("release/idhal")
        }
    };
    let agent = match std::env::var_os("IDHAL_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            run(&[
                "build",
                "-q",
                "--locked",
                "--release",
                "--target",
                MUSL,
                "-p",
                "idhal-bootstrap",
            ])
            .map_err(|e| {
                format!("{e} (is the {MUSL} target installed? `rustup target add {MUSL}`)")
            })?;
            target_dir().join(format!("{MUSL}/release/idhal-bootstrap"))
        }
    };
    Ok((idhal, agent))
}
