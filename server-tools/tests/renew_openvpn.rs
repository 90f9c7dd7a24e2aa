//! Renewed nodes against a real OpenVPN 2.6 server whose configuration is exactly what
//! `idhal openvpn server-config` renders (hooks included), with real OpenVPN clients using the
//! files enrollment and renewal gave, all on 127.0.0.1 (the server's tun gets no address or
//! route; clients use --dev null):
//! - a client picks up its renewed certificate on SIGHUP, and is let in with it after the old
//!   one expired; a client that only renegotiates keeps presenting the old one (the one it
//!   loaded at start) and is refused once that expired: what docs/enrollment.md says of when
//!   OpenVPN reads node.crt;
//! - a renewed node's old certificate stays good until it expires, and `idhal revoke` cuts it
//!   as well as the new one (the CRL lists both; OpenVPN refuses each).

mod enroll_support;

use enroll_support::{
    client, enroll, ok, renew_exchange, renew_request, wait_for, NodeKey, Project,
};
use idhal_manifest::enroll::Response;
use idhal_test_support::openvpn;
use idhal_test_support::process::signal;
use idhal_test_support::{free_port, now, Logged};
use std::path::Path;
use std::time::Duration;

/// A project with `ca` lines in `[ca]`, a real OpenVPN server from its rendered config, and
/// `idhal serve` for enrollment and renewal.
struct Setup {
    p: Project,
    server: Logged,
    web: enroll_support::Server,
    _status_dir: tempfile::TempDir,
}

fn setup(ca: &str) -> Setup {
    let (port, mgmt) = (free_port(), free_port());
    let tmp = tempfile::tempdir().unwrap();
    let status = tmp.path().join("status.log");
    let config = format!(
        "[scheduler]\nbackend = \"none\"\n\
         [openvpn]\nremotes = [\"127.0.0.1:{port}\"]\nlisten = \"127.0.0.1:{port}\"\n\
         management = [\"127.0.0.1:{mgmt}\"]\nkeepalive = [1, 5]\nstatus_file = \"{}\"\n\
         [ca]\n{ca}",
        status.display()
    );
    let p = Project::new(&config);
    ok(p.idhal(&["ca", "issue-server", "vpn1"]));
    let rendered = ok(p.idhal(&["openvpn", "server-config", "--name", "vpn1"]));
    let conf = p.dir.path().join("server.conf");
    std::fs::write(&conf, rendered).unwrap();
    let server = openvpn::server_from_config(
        p.dir.path(),
        &conf,
        &p.dir.path().join("openvpn-server.log"),
    );
    let web = p.serve();
    Setup {
        p,
        server,
        web,
        _status_dir: tmp,
    }
}

impl Setup {
    fn renew(&self, node: &str, key: &NodeKey) -> Response {
        let req = renew_request(node, now(), key);
        renew_exchange(&self.web.addr, &self.p.enroll_key, &req).expect("renewed")
    }

    /// The client-connect hook's runs for `cn` so far.
    fn connects(&self, cn: &str) -> usize {
        self.server
            .log()
            .matches(&format!("idhal hook client-connect: {cn} "))
            .count()
    }

    /// The server's VERIFY ERROR lines for `cn` that name `why`, with the serial they name.
    fn refused(&self, cn: &str, why: &str) -> Vec<u64> {
        self.server
            .log()
            .lines()
            .filter(|l| {
                l.contains("VERIFY ERROR") && l.contains(why) && l.contains(&format!("CN={cn}"))
            })
            .filter_map(|l| {
                l.rsplit_once("serial=")
                    .and_then(|(_, s)| s.trim().parse().ok())
            })
            .collect()
    }
}

/// Replaces `dir/node.crt` the way the agent does: a new file renamed over the old one.
fn install(dir: &Path, pem: &str) {
    let tmp = dir.join(".node.crt.new");
    std::fs::write(&tmp, pem).unwrap();
    std::fs::rename(tmp, dir.join("node.crt")).unwrap();
}

fn ups(c: &Logged) -> usize {
    c.log().matches(openvpn::UP).count()
}

fn serial(pem: &str) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.pem"), pem).unwrap();
    let out =
        idhal_test_support::openssl(dir.path(), &["x509", "-in", "c.pem", "-noout", "-serial"]);
    u64::from_str_radix(out.trim().strip_prefix("serial=").unwrap(), 16).unwrap()
}

fn not_after(pem: &str) -> u64 {
    let der = idhal_manifest::der::pem_decode("CERTIFICATE", pem).unwrap();
    idhal_manifest::der::cert_validity(&der).unwrap().1
}

#[test]
fn sighup_loads_the_renewed_certificate_and_a_renegotiation_does_not() {
    if !openvpn::available() {
        return;
    }
    // 30-second certificates: the old ones expire while the test watches.
    let s = setup("node_cert_validity = \"30s\"\nrenew_min_interval = \"0\"\n");
    let token = s.p.token(&["--uses", "2"]);
    let (ka, kb) = (NodeKey::random(), NodeKey::random());
    let a = enroll(&s.web.addr, &s.p.enroll_key, &token, &ka).unwrap();
    let b = enroll(&s.web.addr, &s.p.enroll_key, &token, &kb).unwrap();
    let (da, db) = (s.p.dir.path().join("a"), s.p.dir.path().join("b"));
    let mut ca = client(&da, &a, &ka);
    // b renegotiates its TLS session every 5 s (the server's default is an hour).
    std::fs::create_dir_all(&db).unwrap();
    for (name, text) in [
        ("ca.crt", &b.ca),
        ("node.crt", &b.certificate),
        ("openvpn.conf", &b.openvpn),
        ("node.key", &kb.pem()),
    ] {
        std::fs::write(db.join(name), text).unwrap();
    }
    let mut cb = openvpn::spawn(
        openvpn::command(&db).args([
            "--config",
            "openvpn.conf",
            "--dev",
            "null",
            "--verb",
            "3",
            "--reneg-sec",
            "5",
        ]),
        &db.join("client.log"),
    );
    ca.wait_log(openvpn::UP, openvpn::UP_LIMIT);
    cb.wait_log(openvpn::UP, openvpn::UP_LIMIT);
    let old_until = not_after(&a.certificate).max(not_after(&b.certificate));

    // Renewed 12 s after enrollment: the new certificates outlive the old ones by that much,
    // time for a to reconnect once the old ones expired.
    wait_for(
        "12 s of the old certificates",
        Duration::from_secs(30),
        || now() >= old_until - 18,
    );
    let (ra, rb) = (s.renew(&a.node, &ka), s.renew(&b.node, &kb));
    assert!(not_after(&ra.certificate) >= old_until + 10);
    install(&da, &ra.certificate);
    install(&db, &rb.certificate);
    // SIGHUP: a full restart, node.crt read again.
    signal("HUP", &ca.pid().to_string());
    wait_for("a up again after SIGHUP", openvpn::UP_LIMIT, || {
        ups(&ca) == 2
    });
    assert!(
        ca.log()
            .contains("SIGHUP[hard,] received, process restarting"),
        "{}",
        ca.log()
    );

    // Past the old certificates' end. a reconnects (SIGUSR1, as after a lost connection) with
    // the certificate it holds, the new one: accepted, and the hook runs for it.
    wait_for(
        "the old certificates to expire",
        Duration::from_secs(60),
        || now() > old_until + 1,
    );
    let before = s.connects(&a.node);
    signal("USR1", &ca.pid().to_string());
    wait_for("a up with its new certificate", openvpn::UP_LIMIT, || {
        ups(&ca) == 3
    });
    wait_for("the hook let a in again", Duration::from_secs(10), || {
        s.connects(&a.node) > before
    });
    assert_eq!(
        s.refused(&a.node, "certificate has expired"),
        Vec::<u64>::new()
    );

    // b never restarted: its next renegotiation presents the certificate it loaded at start,
    // which has expired, whatever node.crt says now.
    wait_for("b's renegotiation refused", Duration::from_secs(60), || {
        !s.refused(&b.node, "certificate has expired").is_empty()
    });
    let serials = s.refused(&b.node, "certificate has expired");
    assert!(
        serials.iter().all(|n| *n == serial(&b.certificate)),
        "{serials:?}: not only the old serial {}",
        serial(&b.certificate)
    );
    assert_ne!(serial(&rb.certificate), serial(&b.certificate));
    println!(
        "b (renegotiating every 5 s) was refused with its old serial {}; a (SIGHUP) is in with {}",
        serial(&b.certificate),
        serial(&ra.certificate)
    );
}

#[test]
fn a_renewed_nodes_old_certificate_stays_good_until_revoked_then_both_are_refused() {
    if !openvpn::available() {
        return;
    }
    let s = setup("renew_min_interval = \"0\"\n");
    let token = s.p.token(&[]);
    let key = NodeKey::random();
    let old = enroll(&s.web.addr, &s.p.enroll_key, &token, &key).unwrap();
    let new = s.renew(&old.node, &key);
    assert_ne!(serial(&new.certificate), serial(&old.certificate));

    // The old certificate, renewed but not expired, still connects...
    let mut c = client(&s.p.dir.path().join("old"), &old, &key);
    c.wait_log(openvpn::UP, openvpn::UP_LIMIT);
    drop(c);
    // ... and so does the new one, with the same address from the hook.
    let mut c = client(&s.p.dir.path().join("new"), &new, &key);
    c.wait_log(openvpn::UP, openvpn::UP_LIMIT);
    assert!(
        c.log()
            .contains(&format!("ifconfig {} 255.255.0.0", new.address)),
        "{}",
        c.log()
    );
    wait_for("both connections hooked", Duration::from_secs(10), || {
        s.connects(&new.node) == 2
    });

    // Revoked: dropped at once, and neither certificate comes back.
    let said = ok(s.p.idhal(&["revoke", &new.node]));
    assert!(said.contains("dropped by the OpenVPN server"), "{said}");
    assert!(said.contains("every certificate it was given"), "{said}");
    let mut stale = client(&s.p.dir.path().join("old2"), &old, &key);
    wait_for(
        "both serials refused as revoked",
        Duration::from_secs(60),
        || {
            let refused = s.refused(&new.node, "certificate revoked");
            refused.contains(&serial(&old.certificate))
                && refused.contains(&serial(&new.certificate))
        },
    );
    assert_eq!(s.connects(&new.node), 2, "{}", s.server.log());
    stale.stop();
    c.stop();
}
