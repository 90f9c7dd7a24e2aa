//! `idhal-bootstrap renew` end to end against the real server (`idhal serve`'s `POST /renew`,
//! common/server.rs): a certificate not due sends nothing; a due one is replaced in place (a
//! new serial for the same key, checked with openssl) and the one line on stdout says so; each
//! refusal exits 5 and changes nothing, as do a tampered answer and a signed one for another
//! address; the shipped scriptlet sends SIGHUP to the tunnel after a renewal.

mod common;
use common::server::*;
use common::*;
use idhal_manifest::der;
use idhal_manifest::enroll::{EnrollKey, KeyPair, Response, Seed};
use idhal_manifest::time::rfc3339;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

/// No management interface (`idhal revoke` drops no session and touches no port), and every
/// renewal signs.
const EVERY_TIME: &str = "management = []\n[ca]\nrenew_min_interval = \"0\"\n";

/// `renew` against `server` with `extra` flags: the run and its stdout.
fn renew(node: &Node, server: &str, extra: &[&str]) -> (Run, String) {
    let mut c = node.command("renew", &["--server", server]);
    c.args(extra);
    let run = Run(c.output().unwrap());
    let out = String::from_utf8_lossy(&run.0.stdout).into_owned();
    (run, out)
}

/// Every file of `enroll/` with its bytes, mode and mtime: what "nothing written" compares.
fn enroll_dir(node: &Node) -> Vec<(String, Vec<u8>, u32, std::time::SystemTime)> {
    let mut files: Vec<_> = std::fs::read_dir(node.state().join("enroll"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            (
                e.file_name().into_string().unwrap(),
                std::fs::read(e.path()).unwrap(),
                meta.permissions().mode() & 0o777,
                meta.modified().unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

fn validity(pem: &str) -> (u64, u64) {
    der::cert_validity(&der::pem_decode("CERTIFICATE", pem).unwrap()).unwrap()
}

fn node_crt(node: &Node) -> String {
    node.read("state/enroll/node.crt").unwrap()
}

/// A project whose manifest names its enrollment key, its server, and an enrolled node.
fn enrolled(extra: &str) -> (Project, Server, Node) {
    let project = Project::with_openvpn(extra);
    project.sign_with_enroll_key();
    let server = project.serve();
    let node = project.node(&server);
    enroll_new(&project, &node, &server.url);
    (project, server, node)
}

#[test]
fn not_due_sends_nothing_and_a_due_certificate_is_replaced_in_place() {
    let (_project, server, node) = enrolled(EVERY_TIME);
    let first = node_crt(&node);
    let (from, until) = validity(&first);
    // Fresh from enrollment, 30 days: due at 66 % of its lifetime. Nothing is sent (the
    // server it is pointed at records every request).
    let watch_dir = tempfile::tempdir().unwrap();
    let watch = TestServer::start(watch_dir.path());
    let before = enroll_dir(&node);
    let (run, out) = renew(&node, &watch.url, &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert_eq!(
        out,
        format!("not-due {}\n", rfc3339(from + (until - from) / 100 * 66))
    );
    assert_eq!(run.stderr(), "");
    assert_eq!(*watch.requests.lock().unwrap(), Vec::<String>::new());
    assert_eq!(enroll_dir(&node), before);

    // --force: renewed now. A new certificate for the same key and CN, a new serial, valid
    // from now; the answer's CA and client config are written again (the same here).
    let (run, out) = renew(&node, &server.url, &["--force"]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let second = node_crt(&node);
    assert_ne!(second, first);
    let (from2, until2) = validity(&second);
    assert_eq!(out, format!("renewed {}\n", rfc3339(until2)));
    assert!(from2 >= from && until2 - from2 == until - from);
    let dir = node.state().join("enroll");
    assert_eq!(
        openssl(&dir, &["verify", "-CAfile", "ca.crt", "node.crt"]),
        "node.crt: OK\n"
    );
    assert_eq!(
        openssl(&dir, &["x509", "-in", "node.crt", "-noout", "-pubkey"]),
        openssl(&dir, &["pkey", "-in", "node.key", "-pubout"])
    );
    let serial = |pem: &str| {
        std::fs::write(node.path("c.pem"), pem).unwrap();
        openssl(
            node.dir.path(),
            &["x509", "-in", "c.pem", "-noout", "-serial", "-subject"],
        )
    };
    let (s1, s2) = (serial(&first), serial(&second));
    assert!(
        s1.contains("serial=01\n") && s2.contains("serial=02\n"),
        "{s1}{s2}"
    );
    assert_eq!(s1.lines().nth(1), s2.lines().nth(1), "the same subject");
    // What identifies the node is untouched; every file whole, with its mode, no temp file.
    let after = enroll_dir(&node);
    let names: Vec<&str> = after.iter().map(|f| f.0.as_str()).collect();
    assert_eq!(names, ENROLLED);
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b.2, a.2, "{} mode", a.0);
        if ["node.key", "node-id", "address"].contains(&a.0.as_str()) {
            assert_eq!(b, a, "{} changed", a.0);
        }
        if ["ca.crt", "openvpn.conf"].contains(&a.0.as_str()) {
            assert_eq!(b.1, a.1, "{} content", a.0);
            assert!(a.3 >= b.3, "{} not rewritten", a.0);
        }
    }

    // renew_at in bootstrap.conf: at 0 % a certificate is due as soon as it is valid.
    std::fs::write(node.config(), "retries = 0\ntimeout = 5s\nrenew_at = 0\n").unwrap();
    let (run, out) = renew(&node, &server.url, &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert!(out.starts_with("renewed "), "{out}");
    assert!(serial(&node_crt(&node)).contains("serial=03\n"));
    std::fs::write(node.config(), "renew_at = 100\n").unwrap();
    renew(&node, &server.url, &[]).0.expect(
        3,
        "renew_at = \"100\": a percentage of the lifetime is below 100",
    );

    // Eight at once: each renews or finds enroll.lock held; the files end up whole.
    std::fs::write(node.config(), "retries = 0\ntimeout = 5s\n").unwrap();
    let runs: Vec<_> = (0..8)
        .map(|_| {
            node.command("renew", &["--server", &server.url, "--force"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let codes: Vec<i32> = runs
        .into_iter()
        .map(|c| c.wait_with_output().unwrap().status.code().unwrap())
        .collect();
    assert!(codes.iter().all(|c| *c == 0 || *c == 7), "{codes:?}");
    assert!(codes.contains(&0), "{codes:?}");
    let names: Vec<String> = enroll_dir(&node).into_iter().map(|f| f.0).collect();
    assert_eq!(names, ENROLLED, "temp files left behind");
    assert_eq!(
        openssl(&dir, &["verify", "-CAfile", "ca.crt", "node.crt"]),
        "node.crt: OK\n"
    );
}

#[test]
fn within_the_servers_minimum_interval_the_answer_is_unchanged() {
    // The server's default renew_min_interval (1 h): just enrolled, the answer is the very
    // certificate the node has.
    let (_project, server, node) = enrolled("management = []\n");
    let before = enroll_dir(&node);
    let (run, out) = renew(&node, &server.url, &["--force"]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let (_, until) = validity(&node_crt(&node));
    assert_eq!(out, format!("unchanged {}\n", rfc3339(until)));
    assert_eq!(enroll_dir(&node), before, "nothing written");
}

#[test]
fn each_refusal_exits_5_and_changes_nothing() {
    let (project, server, node) = enrolled(EVERY_TIME);
    let url = server.url.trim_end_matches('/').to_owned();
    let unchanged = |node: &Node, run: &Run, status: &str| {
        let before = enroll_dir(node);
        run.expect(
            5,
            &format!("refused: renew {url}/renew: server answered HTTP {status}"),
        );
        assert_eq!(enroll_dir(node), before);
        assert_eq!(run.0.stdout, b"", "a refusal prints no line for scripts");
    };

    // Another node's key in node.key (a copied disk): not this node's signature.
    let other = project.node(&server);
    enroll_new(&project, &other, &server.url);
    let own_key = node.read("state/enroll/node.key").unwrap();
    std::fs::write(
        node.state().join("enroll/node.key"),
        other.read("state/enroll/node.key").unwrap(),
    )
    .unwrap();
    let before = enroll_dir(&node);
    let (run, _) = renew(&node, &server.url, &["--force"]);
    run.expect(
        5,
        &format!(
            "refused: renew {url}/renew: server answered HTTP 401: the request is not signed by \
             node client1's enrollment key"
        ),
    );
    assert_eq!(enroll_dir(&node), before);
    std::fs::write(node.state().join("enroll/node.key"), own_key).unwrap();

    // A server whose database never saw client1.
    let elsewhere_project = Project::new();
    elsewhere_project.sign_with_enroll_key();
    let elsewhere = elsewhere_project.serve();
    let before = enroll_dir(&node);
    let (run, _) = renew(&node, &elsewhere.url, &["--force"]);
    run.expect(
        5,
        "server answered HTTP 403: unknown node client1: enroll it first",
    );
    assert_eq!(enroll_dir(&node), before);

    // Revoked.
    ok(project.idhal(&["revoke", "client1"]));
    let (run, _) = renew(&node, &server.url, &["--force"]);
    unchanged(&node, &run, "410: node client1 was revoked");
    // Not due is still not due: a revoked node learns it only when it asks.
    renew(&node, &server.url, &[]).0.expect(0, "");
}

#[test]
fn an_expired_certificate_is_refused_it_must_enroll_again() {
    // 10-second certificates: the node was off for longer than its validity.
    let (_project, server, node) = enrolled(
        "management = []\n[ca]\nnode_cert_validity = \"10s\"\nrenew_min_interval = \"0\"\n",
    );
    let (_, until) = validity(&node_crt(&node));
    wait_for(
        "the certificate to expire",
        std::time::Duration::from_secs(60),
        || now() > until,
    );
    let before = enroll_dir(&node);
    let (run, out) = renew(&node, &server.url, &[]);
    run.expect(
        5,
        &format!(
            "server answered HTTP 410: certificate of node client1 expired at {}: enroll it \
             again with a new token",
            rfc3339(until)
        ),
    );
    assert_eq!(out, "");
    assert_eq!(enroll_dir(&node), before);
}

/// The proxy's job: `rewrite` the answer's body on its way to the node.
fn through(rewrite: MakeRewrite, want: &str) {
    let (project, server, node) = enrolled(EVERY_TIME);
    let via = rewriting_proxy(&server.url, rewrite(&project));
    let before = enroll_dir(&node);
    let (run, out) = renew(&node, &via, &["--force"]);
    run.expect(5, &format!("refused: renewal answer: {want}"));
    assert_eq!(out, "");
    assert_eq!(enroll_dir(&node), before);
    // The server itself still answers.
    let (run, out) = renew(&node, &server.url, &["--force"]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert!(out.starts_with("renewed "), "{out}");
}

/// Makes the proxy's rewrite, given the project (its enrollment key).
type MakeRewrite = Box<dyn Fn(&Project) -> Rewrite>;

#[test]
fn a_tampered_answer_is_refused_and_changes_nothing() {
    through(
        Box::new(|_| {
            Arc::new(|_, mut body: Vec<u8>| {
                let middle = body.len() / 2;
                body[middle] ^= 0x01;
                body
            })
        }),
        "the response is not signed by the enrollment key the signed manifest names",
    );
}

/// A proxy rewrite that changes the answer with `edit` and signs it again with the real
/// enrollment key, as a server with a bug or a mixed-up database would.
fn resigned(edit: fn(&mut Response)) -> MakeRewrite {
    Box::new(move |project: &Project| {
        let pem =
            std::fs::read_to_string(project.path("state/projects/default/enroll.key")).unwrap();
        let seed =
            der::ed25519_seed_from_pkcs8(&der::pem_decode("PRIVATE KEY", &pem).unwrap()).unwrap();
        let kp = KeyPair::from_seed(Seed::new(seed));
        let key = EnrollKey(*kp.pk);
        Arc::new(move |request: &[u8], body: Vec<u8>| {
            let digest = idhal_manifest::renew::request_digest(request);
            let mut r = Response::verify(&body, &key, &digest).unwrap();
            edit(&mut r);
            r.sign(&kp)
        })
    })
}

#[test]
fn an_answer_signed_for_another_address_is_refused() {
    // The tunnel would come up elsewhere.
    through(
        resigned(|r| r.address = "10.134.9.9".parse().unwrap()),
        "not for this node's id, address and key, or no validity left",
    );
}

#[test]
fn an_answer_signed_with_a_certificate_of_another_key_is_refused() {
    // The CA's own certificate in place of the node's: valid, for another key. Written, OpenVPN
    // would refuse to start with node.key, and the node would read as not due for weeks.
    through(
        resigned(|r| r.certificate = r.ca.clone()),
        "not for this node's id, address and key, or no validity left",
    );
}

#[test]
fn preconditions_and_failed_fetches() {
    let project = Project::with_openvpn(EVERY_TIME);
    project.sign_with_enroll_key();
    let server = project.serve();
    let watch_dir = tempfile::tempdir().unwrap();
    let watch = TestServer::start(watch_dir.path());

    // No state at all, then no enrollment: exit 3, nothing sent.
    let fresh = Node::new(&server.url);
    renew(&fresh, &watch.url, &[]).0.expect(
        3,
        "not enrolled: `renew` runs after `idhal-bootstrap enroll` succeeded",
    );
    let node = project.node(&server);
    renew(&node, &watch.url, &["--force"]).0.expect(
        3,
        "not enrolled: `renew` runs after `idhal-bootstrap enroll` succeeded",
    );
    enroll_new(&project, &node, &server.url);
    // A node id the wire format refuses (a hand edit): nothing signed or sent.
    let id = node.state().join("enroll/node-id");
    std::fs::write(&id, "../client1\n").unwrap();
    renew(&node, &watch.url, &["--force"])
        .0
        .expect(3, "enroll/node-id: node id \"../client1\" is invalid");
    std::fs::write(&id, "client1\n").unwrap();
    // One enroll or renew at a time.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(node.state().join("enroll.lock"))
        .unwrap();
    lock.try_lock().unwrap();
    renew(&node, &watch.url, &["--force"])
        .0
        .expect(7, "enroll.lock is held");
    drop(lock);
    assert_eq!(*watch.requests.lock().unwrap(), Vec::<String>::new());

    // A damaged certificate is due (renewing mends it): it is sent for at once. A server that
    // stays unavailable is a fetch failure after the retries, each a request; nothing written.
    std::fs::write(node.state().join("enroll/node.crt"), "garbage\n").unwrap();
    let before = enroll_dir(&node);
    watch.set_fault(Fault::Unavailable(100));
    let (run, out) = renew(&node, &watch.url, &["--retries", "2"]);
    run.expect(4, "server answered HTTP 503");
    assert_eq!(out, "");
    assert_eq!(
        *watch.requests.lock().unwrap(),
        ["/renew", "/renew", "/renew"]
    );
    assert_eq!(enroll_dir(&node), before);
    // Trickled or endless answers: bounded, exit 4, nothing written.
    for (fault, want) in [
        (Fault::Trickle, "timed out".to_owned()),
        (
            Fault::Endless,
            format!(
                "response larger than the {}-byte limit",
                idhal_manifest::enroll::MAX_RESPONSE
            ),
        ),
    ] {
        watch.set_fault(fault);
        let (run, _) = renew(&node, &watch.url, &["--timeout", "1s"]);
        run.expect(4, &want);
        assert_eq!(enroll_dir(&node), before);
    }
    // The real server mends it.
    let (run, out) = renew(&node, &server.url, &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert!(out.starts_with("renewed "), "{out}");
    validity(&node_crt(&node));
}

/// The shipped scriptlet, run by the agent as a scriptlet: it renews, prints the line to its
/// log, and sends SIGHUP to the OpenVPN named by the pid file 000-enroll.sh writes (here a
/// stand-in whose process name is `openvpn`). Not due: no signal.
#[test]
fn the_shipped_scriptlet_renews_and_signals_the_tunnel() {
    let (project, server, node) = enrolled(EVERY_TIME);
    // On this test machine, the systemd branch would signal the host's units: the scriptlet
    // runs with the check pointed at a directory that does not exist.
    let example = include_str!("../dist/990-renew.sh.example")
        .replace("/run/systemd/system", "/nonexistent/systemd");
    // `idhal-bootstrap` on PATH with this node's settings (an image has them in
    // /etc/idhal/bootstrap.conf).
    let bin = node.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let wrapper = bin.join("idhal-bootstrap");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec '{}' \"$@\" --config '{}' --server '{}'\n",
            env!("CARGO_BIN_EXE_idhal-bootstrap"),
            node.config().display(),
            server.url
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let fake = bin.join("openvpn");
    std::os::unix::fs::symlink("/bin/sleep", &fake).unwrap();
    let enroll_dir = node.state().join("enroll");
    // `program` sleeping in `dir`, named by the pid file.
    let started = |program: &std::path::Path, dir: &std::path::Path| {
        let child = std::process::Command::new(program)
            .arg("600")
            .current_dir(dir)
            .spawn()
            .unwrap();
        std::fs::write(enroll_dir.join("openvpn.pid"), format!("{}\n", child.id())).unwrap();
        child
    };
    // What 000-enroll.sh does as it starts the tunnel: the copy of what it reads, then
    // OpenVPN working in enroll/.
    let tunnel = || {
        std::fs::copy(enroll_dir.join("node.crt"), enroll_dir.join("tunnel.crt")).unwrap();
        started(&fake, &enroll_dir)
    };
    let run_with_path = |serial_note: &str| {
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
        let out = node.command("run", &[]).env("PATH", path).output().unwrap();
        let run = Run(out);
        assert_eq!(run.code(), 0, "{serial_note}: {}", run.stderr());
        node.read("state/scriptlets/990-renew/log").unwrap()
    };
    let sign = |body: &str| {
        let dir = tempfile::tempdir_in(project.dir.path()).unwrap();
        std::fs::write(dir.path().join("990-renew.sh"), body).unwrap();
        let key = project.path("keys/idhal.key");
        let out = project.path("pub");
        ok(project.idhal(&[
            "sign",
            "--key",
            key.to_str().unwrap(),
            "--param",
            &format!("enroll-key={}", project.enroll_key),
            "--out",
            out.to_str().unwrap(),
            dir.path().to_str().unwrap(),
        ]));
    };
    sign(&example);

    // Not due: the line, no signal.
    let mut child = tunnel();
    let log = run_with_path("not due");
    assert!(log.starts_with("not-due "), "{log}");
    assert_eq!(
        child.try_wait().unwrap(),
        None,
        "signalled though nothing changed"
    );

    // Due (renew_at = 0): renewed, then SIGHUP to the tunnel.
    std::fs::write(node.config(), "retries = 0\ntimeout = 5s\nrenew_at = 0\n").unwrap();
    let log = run_with_path("due");
    assert!(log.starts_with("renewed "), "{log}");
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(1), "not SIGHUP: {status:?}");

    // Signalled once: the next run (still due) renews again and signals again, a run after a
    // signal that reached the tunnel with nothing new does not.
    std::fs::write(node.config(), "retries = 0\ntimeout = 5s\n").unwrap();
    let mut child = tunnel();
    let log = run_with_path("signalled before");
    assert!(log.starts_with("not-due "), "{log}");
    assert_eq!(child.try_wait().unwrap(), None, "signalled twice");

    // A renewal whose signal was lost (no tunnel of ours then: here a pid naming another
    // process, as after a reboot): no signal to that process, and the next run with the
    // tunnel back signals it, though `renew` itself says not-due.
    let mut other = started(std::path::Path::new("/bin/sleep"), &enroll_dir);
    std::fs::write(node.config(), "retries = 0\ntimeout = 5s\nrenew_at = 0\n").unwrap();
    let log = run_with_path("stale pid");
    assert!(
        log.contains("renewed ") && log.contains("no OpenVPN of ours running"),
        "{log}"
    );
    assert_eq!(other.try_wait().unwrap(), None);
    other.kill().unwrap();
    other.wait().unwrap();
    // An `openvpn` that is not ours (working elsewhere): not signalled either.
    let mut foreign = started(&fake, node.dir.path());
    std::fs::write(node.config(), "retries = 0\ntimeout = 5s\n").unwrap();
    let log = run_with_path("foreign openvpn");
    assert!(log.contains("no OpenVPN of ours running"), "{log}");
    assert_eq!(
        foreign.try_wait().unwrap(),
        None,
        "signalled a foreign openvpn"
    );
    foreign.kill().unwrap();
    foreign.wait().unwrap();
    // Ours back (without a new copy, as a tunnel restarted by hand): signalled now.
    let mut child = started(&fake, &enroll_dir);
    let log = run_with_path("lost signal");
    assert!(log.starts_with("not-due "), "{log}");
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(1),
        "the lost signal was not sent again: {status:?}"
    );
}
