//! Scenarios 1 and 2 up to enrollment: a node's tunnel comes up from a signed scriptlet, OpenVPN
//! runs the real `idhal hook`, and the node becomes Alive in a real OAR 2.5 (PostgreSQL) with its
//! properties and gets A/PTR records in a real Knot; power-off makes it Absent; the next boot on
//! the same disk makes the same resource Alive again. Certificates are baked into the node's
//! initrd (standing in for enrollment, issue 3). OAR and Knot come from server-tools' own hook
//! test components (one definition, started on 127.0.0.1 with ephemeral ports).
#[path = "../../server-tools/tests/hook_support/mod.rs"]
mod hook_support;

use hook_support::{empty_zone, Knot, Oar, TSIG_SECRET};
use idhal_image_build::cpio::Tree;
use idhal_qemu_tests::vpn::{OpenVpnServer, Pki};
use idhal_qemu_tests::{env_or_skip, Forward, Limits};
use std::time::{Duration, Instant};

/// Runs at every boot (a real node would start its OpenVPN service itself): starts OpenVPN with
/// the baked certificate and waits, bounded, for the tunnel address.
const TUNNEL_SCRIPTLET: &str = r#"#!/bin/sh
# idhal: frequency=boot
d=/etc/idhal/test-vpn
openvpn --client --proto tcp-client --remote 10.0.2.100 1194 --connect-retry 1 2 \
  --dev tun --disable-dco --ca $d/ca.crt --cert $d/node.crt --key $d/node.key \
  --daemon --log /tmp/openvpn.log --verb 3
i=0
while [ $i -lt 300 ]; do
  a=$(ip -4 addr show tun0 2>/dev/null | sed -n 's/.*inet \([0-9.]*\).*/\1/p')
  [ -n "$a" ] && { echo "IDHAL-TEST tunnel-up addr=$a" > /dev/console; exit 0; }
  sleep 0.1; i=$((i + 1))
done
cat /tmp/openvpn.log > /dev/console
exit 1
"#;

/// Polls `f` until it returns Some, within `limit`; the panic message names `what`.
fn wait<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn vm_node_becomes_alive_in_oar_and_dns_then_absent_then_alive_again() {
    if !hook_support::require(&[
        "/usr/sbin/oar-database",
        "/usr/lib/oar/Almighty",
        "/usr/sbin/knotd",
        "/usr/bin/kdig",
        &hook_support::pg_available(),
    ]) {
        return;
    }
    let mut env = env_or_skip!("cluster");
    let oar = Oar::start();
    let knot = Knot::start(&[
        ("idhal.test", empty_zone("idhal.test")),
        ("134.10.in-addr.arpa", empty_zone("134.10.in-addr.arpa")),
    ]);
    let tsig = env.path().join("tsig.key");
    knot.write_key(&tsig, TSIG_SECRET);
    let cfg = env.path().join("server.toml");
    std::fs::write(
        &cfg,
        format!(
            "[names]\ndomain = \"idhal.test\"\n\
             [dns]\nupdate = \"rfc2136\"\nserver = \"127.0.0.1:{}\"\ntsig_key_file = \"{}\"\n{}",
            knot.port,
            tsig.display(),
            oar.config_section()
        ),
    )
    .unwrap();
    let hook = format!(
        "{} --config {} --state-dir {} hook",
        env.shared.idhal.display(),
        cfg.display(),
        env.path().join("server-state").display()
    );
    let pki = Pki::new(&env.path().join("pki"), &["vnode-a"]);
    let server = OpenVpnServer::start(&pki, Some(&hook));

    env.project.scriptlet("000-tunnel", TUNNEL_SCRIPTLET);
    env.project.sign(&[]);
    let mut files = Tree::default();
    files.file("etc/idhal/test-vpn/ca.crt", 0o600, pki.file("ca.crt"));
    files.file(
        "etc/idhal/test-vpn/node.crt",
        0o600,
        pki.file("vnode-a.crt"),
    );
    files.file(
        "etc/idhal/test-vpn/node.key",
        0o600,
        pki.file("vnode-a.key"),
    );
    let mut spec = env.spec_with(files);
    spec.forwards.push(Forward {
        guest_port: 1194,
        host_port: server.port,
    });

    let mut first: Option<(serde_json::Value, String)> = None;
    for boot in 1..=2 {
        let mut vm = env.boot_spec(spec.clone());
        let r = vm.wait_boot_run();
        assert_eq!(r.exit, 0, "{}: {:?}", r.last_message(), r.lines);
        let addr = r
            .lines
            .iter()
            .find_map(|l| l.strip_prefix("IDHAL-TEST tunnel-up addr="))
            .unwrap_or_else(|| panic!("no tunnel: {:?}", r.lines))
            .trim()
            .to_string();
        let octets: Vec<&str> = addr.split('.').collect();
        let host = format!("vnode-{}-{}.idhal.test", octets[2], octets[3]);
        let res = wait("Alive in OAR", Limits::RUN, || {
            oar.host(&host)
                .into_iter()
                .find(|r| r["state"] == "Alive" && r["idhalcn"] == "vnode-a")
        });
        let alive = vm.started.elapsed();
        assert_eq!(res["ip"], addr.as_str());
        assert_eq!(res["idhalclientip"], "127.0.0.1");
        let a = wait("A record", Duration::from_secs(10), || {
            let a = knot.dig(&host, "A");
            (!a.is_empty()).then_some(a)
        });
        assert_eq!(a, std::slice::from_ref(&addr));
        let ptr = format!("{}.{}.134.10.in-addr.arpa", octets[3], octets[2]);
        assert_eq!(knot.dig(&ptr, "PTR"), [format!("{host}.")]);
        eprintln!(
            "FIGURE {}: QEMU start to Alive in OAR {:.2} s wall",
            vm.name,
            alive.as_secs_f64()
        );

        if let Some((r1, addr1)) = &first {
            // Scenario 2: same id (certificate), address and resource after a reboot.
            assert_eq!(&addr, addr1);
            assert_eq!(res["resource_id"], r1["resource_id"]);
            assert_eq!(
                oar.resources(None).len(),
                1,
                "one resource, never a duplicate"
            );
        }
        vm.poweroff();
        wait(
            "Absent in OAR after power-off",
            Duration::from_secs(20),
            || oar.host(&host).into_iter().find(|r| r["state"] == "Absent"),
        );
        if boot == 1 {
            first = Some((res, addr));
        }
    }
}
