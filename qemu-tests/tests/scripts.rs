//! The README's commands themselves: scripts/test.sh refuses to run as anyone but root, first
//! thing, and says how to run it (issue 12 part 6: under it a test that cannot run fails, and
//! without root the OAR/OpenVPN/VM tests cannot).
use std::process::Command;

#[test]
fn test_sh_refuses_a_non_root_user_first_and_says_how_to_run_it() {
    let ws = idhal_qemu_tests::bins::workspace_dir();
    let mut cmd = if idhal_qemu_tests::host::is_root() {
        // As root: run it as nobody. setpriv is util-linux's, on every Debian.
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--",
            "bash",
        ]);
        c
    } else {
        Command::new("bash")
    };
    let out = cmd
        .arg(ws.join("scripts/test.sh"))
        .current_dir(&ws)
        .env_remove("IDHAL_TEST_STRICT")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("must run as root"), "{stderr}");
    assert!(stderr.contains("sudo"), "{stderr}");
    // Refused before the setup step or any cargo command ran.
    assert!(!stdout.contains("==="), "{stdout}");
    assert!(!stdout.contains("all tests passed"), "{stdout}");
}
