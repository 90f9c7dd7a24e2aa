//! Finding the workspace's built binaries, one way for every suite. A package's own integration
//! tests may use cargo's `env!("CARGO_BIN_EXE_<name>")` (cargo builds it first); every other
//! test (the agent's tests need `idhal`, the VM harness needs release builds) calls [`bin`] or
//! [`build`], which run `cargo build -p PKG --bin NAME` once per process into the running
//! test's own target dir, so the binary is never stale and a clean target dir works.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Which build of a binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Profile {
    /// The profile the running test was built with (`target/debug` for a plain `cargo test`).
    Current,
    /// `--release`: what users run (the VM tests; the static agent).
    Release,
}

/// The workspace root (the folder of the root Cargo.toml).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-support sits in the workspace")
        .to_path_buf()
}

/// Where the running test executable was built: (target dir, profile dir name, target triple
/// when cross-built). An integration test runs from `<target>[/<triple>]/<profile>/deps/`, a
/// binary (`idhal-demo`) from `<target>[/<triple>]/<profile>/`.
fn running_build() -> (PathBuf, String, Option<String>) {
    let exe = std::env::current_exe().expect("the test executable's path");
    let mut dir = exe.parent().expect("a folder above the executable");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("a profile folder above deps/");
    }
    let profile = dir
        .file_name()
        .expect("a profile folder")
        .to_string_lossy()
        .into_owned();
    let above = dir.parent().expect("a target dir above the profile");
    // Cargo tags the target dir itself with CACHEDIR.TAG; a folder between it and the profile
    // is a target triple.
    if above.join("CACHEDIR.TAG").exists() || above.parent().is_none() {
        (above.to_path_buf(), profile, None)
    } else {
        let triple = above.file_name().map(|n| n.to_string_lossy().into_owned());
        (
            above.parent().expect("a target dir").to_path_buf(),
            profile,
            triple,
        )
    }
}

/// The target dir the running test was built into (`CARGO_TARGET_DIR` or `<workspace>/target`).
pub fn target_dir() -> PathBuf {
    running_build().0
}

/// `target/<profile>/NAME` of package PKG, built now (once per process) in the running test's
/// profile; panics with cargo's words when that fails.
#[track_caller]
pub fn bin(pkg: &str, name: &str) -> PathBuf {
    build(pkg, name, Profile::Current, None).unwrap_or_else(|e| panic!("{e}"))
}

/// Builds binary NAME of package PKG (for `triple` when given) with `cargo build --locked` into
/// the running test's target dir, once per process, and returns its path. `Err` says what
/// failed (the caller may skip or fail on it: a missing rustup target is not a bug).
pub fn build(
    pkg: &str,
    name: &str,
    profile: Profile,
    triple: Option<&str>,
) -> Result<PathBuf, String> {
    type Key = (String, String, Profile, Option<String>);
    static BUILT: Mutex<Option<HashMap<Key, Result<PathBuf, String>>>> = Mutex::new(None);
    let key = (pkg.into(), name.into(), profile, triple.map(String::from));
    // Held while cargo runs: two tests asking at once build once.
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    built
        .get_or_insert_with(HashMap::new)
        .entry(key)
        .or_insert_with(|| cargo_build(pkg, name, profile, triple))
        .clone()
}

fn cargo_build(
    pkg: &str,
    name: &str,
    profile: Profile,
    triple: Option<&str>,
) -> Result<PathBuf, String> {
    let (target, current, _) = running_build();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "--locked", "-p", pkg, "--bin", name])
        .arg("--target-dir")
        .arg(&target)
        .current_dir(workspace_dir());
    let dir = match profile {
        Profile::Release => {
            cmd.arg("--release");
            "release".to_string()
        }
        Profile::Current => {
            // Cargo names the dev profile's folder "debug"; every other profile by its name.
            let p = if current == "debug" { "dev" } else { &current };
            cmd.args(["--profile", p]);
            current
        }
    };
    if let Some(t) = triple {
        cmd.args(["--target", t]);
    }
    let st = cmd
        .status()
        .map_err(|e| format!("running cargo to build {pkg}'s {name}: {e}"))?;
    if !st.success() {
        return Err(format!(
            "`cargo build -p {pkg} --bin {name}` ({profile:?}{}) failed: {st}",
            triple
                .map(|t| format!(", --target {t}"))
                .unwrap_or_default()
        ));
    }
    let mut path = target;
    if let Some(t) = triple {
        path.push(t);
    }
    path.push(dir);
    path.push(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "cargo built {pkg}'s {name} but {} is not there",
            path.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_build_is_found_from_the_test_executable() {
        let (target, profile, triple) = running_build();
        assert!(target.join("CACHEDIR.TAG").exists(), "{}", target.display());
        assert!(target.join(&profile).is_dir(), "{profile}");
        assert_eq!(triple, None);
    }

    #[test]
    fn a_workspace_binary_is_built_into_this_tests_target_dir_and_runs() {
        let idhal_image = bin("idhal-image-build", "idhal-image");
        let (target, profile, _) = running_build();
        assert_eq!(idhal_image, target.join(profile).join("idhal-image"));
        let out = Command::new(&idhal_image).arg("--help").output().unwrap();
        assert!(out.status.success(), "{out:?}");
        // Once per process: the second ask is the same path, with no second build.
        assert_eq!(bin("idhal-image-build", "idhal-image"), idhal_image);
    }

    #[test]
    fn an_unknown_binary_is_a_clear_error() {
        let e = build("idhal-test-support", "no-such-bin", Profile::Current, None).unwrap_err();
        assert!(
            e.contains("`cargo build -p idhal-test-support --bin no-such-bin` (Current) failed"),
            "{e}"
        );
    }
}
