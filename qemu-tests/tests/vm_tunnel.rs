//! The tunnel path of scenarios 1, 2, 4 and 5, ahead of enrollment: a scriptlet of a signed
//! manifest brings up OpenVPN in the guest to a real OpenVPN 2.6 server on 127.0.0.1 (through
//! guestfwd), which runs the real `idhal hook client-connect/-disconnect` (with no scheduler and
//! no DNS backend yet: OAR and Knot join with scenarios 1 and 2). Certificates are baked into the
//! node's initrd here; enrollment (issue 3) will fetch them instead.
use idhal_image_build::cpio::Tree;
use idhal_qemu_tests::vpn::{OpenVpnServer, Pki};
use idhal_qemu_tests::{env_or_skip, Env, Forward, RunResult, VmSpec};
use std::time::{Duration, Instant};

/// The guest-side OpenVPN port; TUNNEL_SCRIPTLET connects to 10.0.2.100:1194.
const GUEST_VPN_PORT: u16 = 1194;

/// Starts OpenVPN with the node's certificate (its name is in /etc/idhal/test-vpn/name) and
/// waits, bounded, until the tunnel has an address; prints `IDHAL-TEST tunnel-up addr=…`.
const TUNNEL_SCRIPTLET: &str = r#"#!/bin/sh
d=/etc/idhal/test-vpn
n=$(cat $d/name)
openvpn --client --proto tcp-client --remote 10.0.2.100 1194 --connect-retry 1 2 \
  --dev tun --disable-dco --ca $d/ca.crt --cert $d/$n.crt --key $d/$n.key \
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

/// What enrollment will give a node: its name, the CA and its own certificate and key.
fn node_files(pki: &Pki, cn: &str) -> Tree {
    let mut files = Tree::default();
    files.file(
        "etc/idhal/test-vpn/name",
        0o644,
        format!("{cn}\n").into_bytes(),
    );
    for f in [
        "ca.crt".to_string(),
        format!("{cn}.crt"),
        format!("{cn}.key"),
    ] {
        files.file(&format!("etc/idhal/test-vpn/{f}"), 0o600, pki.file(&f));
    }
    files
}

/// `idhal hook` as OpenVPN runs it, with a config without backends (scheduler none, DNS off):
/// the hook validates OpenVPN's environment, takes the node's lock and logs one line.
fn idhal_hook(env: &Env) -> String {
    let cfg = env.path().join("server.toml");
    std::fs::write(
        &cfg,
        "[scheduler]\nbackend = \"none\"\n[dns]\nupdate = \"off\"\n",
    )
    .unwrap();
    format!(
        "{} --config {} --state-dir {} hook",
        env.shared.idhal.display(),
        cfg.display(),
        env.path().join("server-state").display()
    )
}

/// Waits (bounded) for a line of the OpenVPN server's log (where the hook's stderr goes)
/// containing every one of `parts`.
fn wait_log(server: &OpenVpnServer, parts: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(l) = server
            .log_text()
            .lines()
            .find(|l| parts.iter().all(|p| l.contains(p)))
        {
            return l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {parts:?}:\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tunnel_addr(r: &RunResult) -> String {
    assert_eq!(r.exit, 0, "{}: {:?}", r.last_message(), r.lines);
    r.lines
        .iter()
        .find_map(|l| l.strip_prefix("IDHAL-TEST tunnel-up addr="))
        .unwrap_or_else(|| panic!("no tunnel: {:?}", r.lines))
        .trim()
        .to_string()
}

/// Env + PKI + OpenVPN server running `idhal hook` + the signed tunnel scriptlet.
fn setup(env: &mut Env, cns: &[&str]) -> (Pki, OpenVpnServer) {
    let pki = Pki::new(&env.path().join("pki"), cns);
    let server = OpenVpnServer::start(&pki, Some(&idhal_hook(env)));
    env.project.scriptlet("000-tunnel", TUNNEL_SCRIPTLET);
    env.project.sign(&[]);
    (pki, server)
}

fn node_spec(env: &Env, pki: &Pki, server: &OpenVpnServer, cn: &str) -> VmSpec {
    let mut spec = env.spec_with(node_files(pki, cn));
    spec.forwards.push(Forward {
        guest_port: GUEST_VPN_PORT,
        host_port: server.port,
    });
    spec
}

#[test]
fn vm_scriptlet_brings_up_the_tunnel_and_idhal_hook_sees_the_node() {
    let mut env = env_or_skip!("tunnel");
    let (pki, server) = setup(&mut env, &["vnode-1"]);
    let spec = node_spec(&env, &pki, &server, "vnode-1");
    let mut vm = env.boot_spec(spec);
    let addr = tunnel_addr(&vm.wait_boot_run());
    assert!(addr.starts_with("10.134.8."), "{addr}");
    // OpenVPN ran `idhal hook client-connect` for this certificate and the address it got; the
    // node's name comes from the address (`vnode-{3}-{4}`).
    let label = format!(
        "vnode-{}",
        addr.splitn(3, '.').nth(2).unwrap().replace('.', "-")
    );
    wait_log(
        &server,
        &[
            "idhal hook client-connect: vnode-1 ",
            &label,
            &format!("({addr})"),
        ],
    );
    // Power-off: the server notices the node leaving (scenario 2's Absent comes from this hook).
    vm.poweroff();
    wait_log(
        &server,
        &["idhal hook client-disconnect: vnode-1: ", &label],
    );
}

#[test]
fn vm_two_nodes_at_once_get_distinct_tunnel_addresses() {
    // Scenario 5's network half: two guests at once, each with its own disk and certificate.
    let mut env = env_or_skip!("twonodes");
    let (pki, server) = setup(&mut env, &["vnode-1", "vnode-2"]);
    let spec1 = node_spec(&env, &pki, &server, "vnode-1");
    let mut spec2 = node_spec(&env, &pki, &server, "vnode-2");
    spec2.disk = env.new_disk("state2.img");
    let mut vm1 = env.boot_spec(spec1);
    let mut vm2 = env.boot_spec(spec2);
    let (a1, a2) = (
        tunnel_addr(&vm1.wait_boot_run()),
        tunnel_addr(&vm2.wait_boot_run()),
    );
    assert_ne!(a1, a2);
    wait_log(
        &server,
        &["idhal hook client-connect: vnode-1 ", &format!("({a1})")],
    );
    wait_log(
        &server,
        &["idhal hook client-connect: vnode-2 ", &format!("({a2})")],
    );
    vm1.poweroff();
    vm2.poweroff();
}
