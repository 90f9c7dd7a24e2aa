//! Enrolled nodes against a real OpenVPN 2.6 server whose configuration is exactly what
//! `idhal openvpn server-config` renders (hooks included), with real OpenVPN clients using the
//! configuration and certificates from enrollment, all on 127.0.0.1. The server's tun device
//! gets no address or route (--ifconfig-noexec/--route-noexec), clients use --dev null.

mod enroll_support;
mod hook_support;

use enroll_support::{client, enroll, ok, wait_for, NodeKey, Project};
use idhal_test_support::free_port;
use idhal_test_support::openvpn;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

#[test]
fn enrolled_nodes_connect_and_a_revoked_one_is_dropped_and_stays_out() {
    if !openvpn::available() {
        return;
    }
    let (port, mgmt) = (free_port(), free_port());
    let tmp = tempfile::tempdir().unwrap();
    let config = format!(
        "[scheduler]\nbackend = \"none\"\n\
         [openvpn]\nremotes = [\"127.0.0.1:{port}\"]\nlisten = \"127.0.0.1:{port}\"\n\
         management = [\"127.0.0.1:{mgmt}\"]\nkeepalive = [1, 5]\nstatus_file = \"{}\"\n",
        tmp.path().join("status.log").display()
    );
    let p = Project::new(&config);
    let issued = ok(p.idhal(&["ca", "issue-server", "vpn1"]));
    // The management password: made by issue-server, 0600, never overwritten afterwards.
    let pw = p.ca_dir().join("management.pw");
    assert!(
        issued.contains(&format!(
            "management   password in {} (0600, new)",
            pw.display()
        )),
        "{issued}"
    );
    let password = std::fs::read_to_string(&pw).unwrap();
    assert_eq!(
        std::fs::metadata(&pw).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let rendered = ok(p.idhal(&["openvpn", "server-config", "--name", "vpn1"]));
    assert_eq!(std::fs::read_to_string(&pw).unwrap(), password);
    for line in [
        "proto tcp-server\n",
        "dev tun\n",
        "server 10.134.0.0 255.255.0.0 nopool\n",
        &format!("tmp-dir {}\n", p.state.join("openvpn-tmp").display()),
        &format!("management 127.0.0.1 {mgmt} {}\n", pw.display()),
        "hook client-connect\"\n",
        &format!("setenv IDHAL_STATE_DIR {}\n", p.state.display()),
        &format!("setenv IDHAL_CONFIG {}\n", p.config.display()),
        "crl-verify ",
    ] {
        assert!(rendered.contains(line), "no {line:?} in:\n{rendered}");
    }
    // No client-config-dir to keep in sync between servers: the hook gives the address.
    for gone in ["client-config-dir", "ccd-exclusive", "ifconfig-pool"] {
        assert!(
            !rendered
                .lines()
                .any(|l| !l.starts_with('#') && l.contains(gone)),
            "{gone} in:\n{rendered}"
        );
    }
    let conf = p.dir.path().join("server.conf");
    std::fs::write(&conf, &rendered).unwrap();
    let server = openvpn::server_from_config(
        p.dir.path(),
        &conf,
        &p.dir.path().join("openvpn-server.log"),
    );

    let web = p.serve();
    let token = p.token(&["--uses", "2"]);
    let (ka, kb) = (NodeKey::random(), NodeKey::random());
    let a = enroll(&web.addr, &p.enroll_key, &token, &ka).unwrap();
    let b = enroll(&web.addr, &p.enroll_key, &token, &kb).unwrap();
    let ca = client(&p.dir.path().join("a"), &a, &ka);
    let cb = client(&p.dir.path().join("b"), &b, &kb);
    for (c, r) in [(&ca, &a), (&cb, &b)] {
        wait_for(
            &format!("{} tunnel up", r.node),
            Duration::from_secs(30),
            || c.log().contains("Initialization Sequence Completed"),
        );
        // The fixed address from the state database (the hook's ifconfig-push), and the hook
        // saw the node.
        assert!(
            c.log()
                .contains(&format!("ifconfig {} 255.255.0.0", r.address)),
            "{}",
            c.log()
        );
    }
    let connects = |cn: &str| {
        server
            .log()
            .matches(&format!("idhal hook client-connect: {cn} "))
            .count()
    };
    wait_for("hooks ran", Duration::from_secs(10), || {
        connects(&a.node) == 1 && connects(&b.node) == 1
    });
    // ... with this project's state dir (its per-node locks), which only the rendered `setenv`
    // lines give them: the hook command itself names no path.
    let locks: Vec<String> = std::fs::read_dir(p.state.join("locks"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        locks.iter().filter(|l| l.starts_with("node-")).count() == 2,
        "node locks in {}: {locks:?}",
        p.state.display()
    );

    // A certificate of the project's CA whose CN was never enrolled: no ccd-exclusive any more,
    // so TLS lets it in and the hook refuses it at once (exit 1: AUTH_FAILED). OpenVPN then runs
    // client-disconnect for it, which must change nothing.
    let sdir = p.dir.path().join("stranger");
    std::fs::create_dir_all(&sdir).unwrap();
    let (ca_key, ca_crt) = (p.ca_dir().join("ca.key"), p.ca_dir().join("ca.crt"));
    idhal_test_support::x509::leaf(
        &sdir,
        "stranger1",
        ("node.key", "node.crt"),
        (ca_key.to_str().unwrap(), ca_crt.to_str().unwrap()),
        "keyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
    );
    std::fs::write(sdir.join("ca.crt"), &a.ca).unwrap();
    std::fs::write(sdir.join("openvpn.conf"), &a.openvpn).unwrap();
    let stranger = openvpn::spawn(
        openvpn::command(&sdir).args(["--config", "openvpn.conf", "--dev", "null", "--verb", "3"]),
        &sdir.join("client.log"),
    );
    wait_for("the stranger is refused", Duration::from_secs(30), || {
        stranger.log().contains("AUTH_FAILED")
    });
    let log = server.log();
    assert!(
        log.contains("idhal hook client-connect: REFUSED: node stranger1 is not enrolled"),
        "{log}"
    );
    wait_for(
        "the stranger's disconnect changed nothing",
        Duration::from_secs(10),
        || {
            server
                .log()
                .contains("idhal hook client-disconnect: REFUSED: node stranger1 never came up")
        },
    );
    drop(stranger);

    // Configs that get the management password wrong, or have none.
    let variant = |name: &str, extra: &str| {
        let path = p.dir.path().join(name);
        std::fs::write(&path, format!("{config}{extra}")).unwrap();
        path
    };
    let wrong_pw = p.dir.path().join("wrong.pw");
    std::fs::write(&wrong_pw, "not-the-password\n").unwrap();
    let wrong = variant(
        "wrong.toml",
        &format!("management_password_file = \"{}\"\n", wrong_pw.display()),
    );
    let none = variant("none.toml", "management_auth = \"none\"\n");
    let mgmt_addr = format!("127.0.0.1:{mgmt}");

    // Reconcile reads the status from the management interface with the password.
    let said = ok(p.idhal(&["reconcile", "--management", &mgmt_addr]));
    assert!(said.contains(": 2 connected,"), "{said}");
    for (cfg, why) in [
        (&wrong, "refused the password in"),
        (&none, "asks for a password and none is configured"),
    ] {
        let out = enroll_support::idhal(
            &p.state,
            Some(cfg),
            &["reconcile", "--management", &mgmt_addr],
        );
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(why), "{err}");
    }

    // Revoke a with the wrong password: revoked, but the server refuses the kill (exit 4),
    // clearly; a stays connected until the right password drops it.
    let out = enroll_support::idhal(&p.state, Some(&wrong), &["revoke", &a.node]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains(&format!(
            "refused the password in {} (wrong password",
            wrong_pw.display()
        )),
        "{err}"
    );
    assert!(!server
        .log()
        .contains(&format!("idhal hook client-disconnect: {}", a.node)));

    // Revoke a: dropped through the management interface at once, then refused by the CRL.
    let said = ok(p.idhal(&["revoke", &a.node]));
    assert!(said.contains("dropped by the OpenVPN server"), "{said}");
    wait_for("a is disconnected", Duration::from_secs(10), || {
        server
            .log()
            .contains(&format!("idhal hook client-disconnect: {}", a.node))
    });
    // Not a fixed pause: wait until the client has come back and been refused twice (it
    // retries every 1-10 s), so "it stays out" is seen over more than one attempt.
    wait_for(
        "a's reconnection is refused twice",
        Duration::from_secs(60),
        || {
            // One VERIFY ERROR line per attempt (the alert line repeats the reason).
            server
                .log()
                .lines()
                .filter(|l| l.contains("VERIFY ERROR") && l.contains("certificate revoked"))
                .count()
                >= 2
        },
    );
    assert_eq!(
        connects(&a.node),
        1,
        "the revoked node came back:\n{}",
        server.log()
    );
    // b was never disturbed.
    assert_eq!(connects(&b.node), 1);
    assert!(!server
        .log()
        .contains(&format!("idhal hook client-disconnect: {}", b.node)));
    drop(cb);
    drop(ca);
}
