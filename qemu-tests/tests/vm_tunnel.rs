//! The tunnel path of scenarios 1, 2 and 4, ahead of enrollment: a scriptlet of a signed manifest
//! brings up OpenVPN in the guest to a real OpenVPN 2.6 server on 127.0.0.1 (through guestfwd),
//! whose client-connect/-disconnect command runs. Certificates are baked into the node's initrd
//! here; enrollment (issue 3) will fetch them instead, and `idhal hook` (issue 4) will replace
//! the recording hook.
use idhal_image_build::cpio::Tree;
use idhal_qemu_tests::vpn::{OpenVpnServer, Pki};
use idhal_qemu_tests::{env_or_skip, Forward};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

const GUEST_VPN_PORT: u16 = 1194;

#[test]
fn vm_scriptlet_brings_up_the_tunnel_and_the_server_hook_sees_the_node() {
    let mut env = env_or_skip!("tunnel");
    let pki = Pki::new(&env.path().join("pki"), &["vnode-1"]);
    let events = env.path().join("hook-events");
    let hook = env.path().join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$script_type cn=$common_name ip=$ifconfig_pool_remote_ip\" >> {}\n",
            events.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = OpenVpnServer::start(&pki, Some(hook.to_str().unwrap()));

    env.project.scriptlet(
        "000-tunnel",
        &format!(
            "#!/bin/sh\n\
             d=/etc/idhal/test-vpn\n\
             openvpn --client --proto tcp-client --remote 10.0.2.100 {GUEST_VPN_PORT} --connect-retry 1 2 \\\n\
             \x20 --dev tun --disable-dco --ca $d/ca.crt --cert $d/vnode-1.crt --key $d/vnode-1.key \\\n\
             \x20 --daemon --log /tmp/openvpn.log --verb 3\n\
             i=0\n\
             while [ $i -lt 300 ]; do\n\
             \x20 a=$(ip -4 addr show tun0 2>/dev/null | sed -n 's/.*inet \\([0-9.]*\\).*/\\1/p')\n\
             \x20 [ -n \"$a\" ] && {{ echo \"IDHAL-TEST tunnel-up addr=$a\" > /dev/console; exit 0; }}\n\
             \x20 sleep 0.1; i=$((i + 1))\n\
             done\n\
             cat /tmp/openvpn.log > /dev/console\n\
             exit 1\n"
        ),
    );
    env.project.sign(&[]);

    let mut files = Tree::default();
    for f in ["ca.crt", "vnode-1.crt", "vnode-1.key"] {
        files.file(&format!("etc/idhal/test-vpn/{f}"), 0o600, pki.file(f));
    }
    let mut spec = env.spec_with(files);
    spec.forwards.push(Forward {
        guest_port: GUEST_VPN_PORT,
        host_port: server.port,
    });
    let mut vm = env.boot_spec(spec);
    let r = vm.wait_boot_run();
    assert_eq!(r.exit, 0, "{}", r.last_message());
    let up = r
        .lines
        .iter()
        .find(|l| l.starts_with("IDHAL-TEST tunnel-up addr=10.134.8."))
        .unwrap_or_else(|| panic!("no tunnel: {:?}", r.lines))
        .clone();
    // The hook ran on the host for this certificate.
    let deadline = Instant::now() + Duration::from_secs(10);
    let connect = loop {
        let text = std::fs::read_to_string(&events).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.starts_with("client-connect")) {
            break l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no client-connect hook:\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let addr = up
        .split("addr=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(connect, format!("client-connect cn=vnode-1 ip={addr}"));
    // Power-off: the server notices the node leaving (scenario 2's Absent comes from this hook).
    vm.poweroff();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&events)
        .unwrap_or_default()
        .contains("client-disconnect cn=vnode-1")
    {
        assert!(
            Instant::now() < deadline,
            "no client-disconnect hook:\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
