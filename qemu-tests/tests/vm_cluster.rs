//! Issue 5, scenarios 1, 2, 4 and 5, the whole way for real: a vnode boots, pins the key,
//! verifies the signed manifest, and its scriptlet 000 enrolls with a one-time token from QEMU's
//! fw_cfg (`idhal-bootstrap enroll` against `idhal serve`'s `POST /enroll`, the project's CA
//! made by `idhal ca init`) and brings up OpenVPN with what it got, to the server config
//! `idhal openvpn server-config` rendered; OpenVPN runs `idhal hook`, which makes the node Alive
//! in a real OAR 2.5 on PostgreSQL and writes its A/PTR records into a real Knot.
//!
//! One OAR and one Knot serve every test of this binary (`Cluster::shared`); each test has its
//! own CA, state dir and address pool (10.134.N.0/24), so host names never collide.
use idhal_qemu_tests::cluster::{Cluster, DOMAIN};
use idhal_qemu_tests::enroll::{self, Joined};
use idhal_qemu_tests::{Env, EnvOptions, Limits, OpenVpnServer, Vm, VmSpec};
use std::time::{Duration, Instant};

/// A `once` scriptlet after enrollment: it must never run again after a reboot.
const ONCE: &str = "#!/bin/sh\necho \"IDHAL-TEST once-ran\" > /dev/console\n";

/// An env whose CA hands out addresses from `pool`, with the rendered OpenVPN server, the
/// hooks pointed at the shared OAR and Knot, and the enrollment + tunnel scriptlet signed.
fn setup(name: &str, pool: &str) -> Option<(Env, &'static Cluster)> {
    let cluster = Cluster::shared()?;
    let env = Env::with(
        name,
        EnvOptions {
            server_toml: cluster.server_toml(),
            pool: Some(pool.into()),
            vpn: true,
            ..EnvOptions::default()
        },
    )?;
    env.project.scriptlet("000-enroll", enroll::SCRIPTLET);
    env.project.scriptlet("010-once", ONCE);
    assert_eq!(env.project.sign(&[]), 1);
    Some((env, cluster))
}

/// The env's spec with the token file as fw_cfg `opt/idhal/token`.
fn spec_with_token(env: &Env, token: &std::path::Path) -> VmSpec {
    let mut spec = env.spec();
    spec.fw_cfg
        .push((enroll::FW_CFG_TOKEN.into(), token.to_path_buf()));
    spec
}

/// What a node that joined looks like from outside.
struct Member {
    joined: Joined,
    host: String,
    /// Its OAR resource (`oarnodes -J`), Alive.
    resource: serde_json::Value,
    run: idhal_qemu_tests::RunResult,
}

/// Waits for the boot run, the node's enrollment and tunnel, then Alive in OAR with the
/// properties the hook sets and A/PTR in Knot; prints the boot-to-Alive figure: QEMU start to
/// the moment `idhal hook client-connect` reported the node Alive (it reads OAR back first).
fn joins(vm: &mut Vm, vpn: &OpenVpnServer, cluster: &Cluster, node_type: &str) -> Member {
    let run = vm.wait_boot_run();
    let (joined, steps) = Joined::from_run(&run);
    assert_eq!(
        joined.tunnel, joined.address,
        "tun0 has the enrolled address"
    );
    let host = Cluster::host(&joined.address);
    let resource = cluster.wait_state(&host, "Alive", Limits::ALIVE);
    let hook = format!("idhal hook client-connect: {} → {host} ", joined.node);
    let alive = idhal_qemu_tests::wait_until("the hook's line", Duration::from_secs(5), || {
        vpn.seen(vm.started, |l| l.contains(&hook))
    })
    .0 - vm.started;
    assert_eq!(resource["idhalcn"], joined.node.as_str(), "{resource}");
    assert_eq!(resource["ip"], joined.address.as_str(), "{resource}");
    assert_eq!(resource["idhaltype"], node_type, "{resource}");
    assert_eq!(resource["cluster"], node_type, "{resource}");
    // Through user-net every node comes from 127.0.0.1: nodes are known by certificate.
    assert_eq!(resource["idhalclientip"], "127.0.0.1", "{resource}");
    let a = cluster.wait_dns(&host, "A", Duration::from_secs(10));
    assert_eq!(a, std::slice::from_ref(&joined.address));
    let ptr = cluster.wait_dns(
        &Cluster::ptr_name(&joined.address),
        "PTR",
        Duration::from_secs(10),
    );
    assert_eq!(ptr, [format!("{host}.")]);
    eprintln!(
        "FIGURE {}: QEMU start to Alive in OAR {:.2} s wall (agent done {:.2} s wall; guest \
         uptime: enroll {:.2}-{:.2} s, tunnel up {:.2} s; {} {} {})",
        vm.name,
        alive.as_secs_f64(),
        run.since_start.as_secs_f64(),
        steps.enroll_start,
        steps.enrolled,
        steps.tunnel_up,
        joined.node,
        joined.address,
        host
    );
    let breakdown = idhal_qemu_tests::breakdown::boot_to_alive(vm, vpn, &joined.node)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("FIGURE {}: {breakdown}", vm.name);
    Member {
        joined,
        host,
        resource,
        run,
    }
}

/// Waits until `idhal hook client-disconnect` has finished for the node (a line seen after
/// `since`) and checks OAR says Absent; returns the time since `since`.
fn leaves(vpn: &OpenVpnServer, cluster: &Cluster, m: &Member, since: Instant) -> Duration {
    let hook = format!(
        "idhal hook client-disconnect: {}: {} ",
        m.joined.node, m.host
    );
    let at = idhal_qemu_tests::wait_until("the disconnect hook", Limits::ABSENT, || {
        vpn.seen(since, |l| l.contains(&hook))
    })
    .0;
    let res = cluster.resources(&m.host);
    assert_eq!(res.len(), 1, "{res:?}");
    assert_eq!(res[0]["state"], "Absent", "{res:?}");
    at - since
}

#[test]
fn vm_first_boot_enrolls_with_a_fw_cfg_token_and_becomes_alive_in_oar_and_dns() {
    let Some((mut env, cluster)) = setup("enroll", "10.134.1.0/24") else {
        return;
    };
    // Not the default type: the node's type must come from its token.
    let (token_id, token) = env.token("cloud", &[]);
    let mut vm = env.boot_spec(spec_with_token(&env, &token));
    let m = joins(&mut vm, env.vpn(), cluster, "cloud");
    let r = &m.run;

    // The key baked into the image is pinned, serial 1 verified, both scriptlets done.
    assert_eq!(
        r.status["pinned_key"]["fingerprint"],
        env.project.fingerprint.as_str()
    );
    assert_eq!(r.status["serial"], 1);
    assert_eq!(r.scriptlet_state("000-enroll").as_deref(), Some("done"));
    assert_eq!(r.scriptlet_state("010-once").as_deref(), Some("done"));
    assert_eq!(r.count("IDHAL-TEST once-ran"), 1);
    // Enrolled once, with the token from fw_cfg, at the manifest server's /enroll.
    assert_eq!(
        r.count(&format!("with token {token_id} (fw_cfg ")),
        1,
        "{:?}",
        r.lines
    );
    assert_eq!(
        r.count("idhal-bootstrap: enrolled as client1, address 10.134.1.2"),
        1
    );
    assert_eq!(
        (m.joined.node.as_str(), m.joined.address.as_str()),
        ("client1", "10.134.1.2")
    );
    assert_eq!(m.host, format!("vnode-1-2.{DOMAIN}"));
    assert_eq!(r.status["enrollment"]["node"], "client1");
    assert_eq!(r.status["enrollment"]["address"], "10.134.1.2");

    // The server's side: one node of the token's type, the one-time token spent.
    let nodes = env.ca.nodes();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0]["id"], "client1");
    assert_eq!(nodes[0]["address"], "10.134.1.2");
    assert_eq!(nodes[0]["type"], "cloud");
    assert!(nodes[0]["revoked_at"].is_null());
    let tokens = env.ca.tokens();
    assert_eq!(
        (tokens[0]["uses"].clone(), tokens[0]["used"].clone()),
        (1.into(), 1.into())
    );
    // OpenVPN ran the real hook for the certificate the CA made (CN = node id).
    let vpn = env.vpn();
    assert_eq!(
        vpn.count("idhal hook client-connect: client1 "),
        1,
        "{}",
        vpn.log_text()
    );
    assert_eq!(cluster.resources(&m.host).len(), 1);
    let t = Instant::now();
    vm.poweroff();
    leaves(vpn, cluster, &m, t);
}

#[test]
fn vm_power_off_makes_the_node_absent_and_the_next_boot_rejoins_as_the_same_node() {
    let Some((mut env, cluster)) = setup("reboot", "10.134.2.0/24") else {
        return;
    };
    let (_, token) = env.token("vnode", &[]);
    let spec = spec_with_token(&env, &token);
    let mut vm = env.boot_spec(spec.clone());
    let first = joins(&mut vm, env.vpn(), cluster, "vnode");
    assert_eq!(first.run.count("IDHAL-TEST once-ran"), 1);
    let t = Instant::now();
    vm.poweroff();
    eprintln!(
        "FIGURE reboot: power-off request to Absent in OAR {:.2} s",
        leaves(env.vpn(), cluster, &first, t).as_secs_f64()
    );
    // Durable on the disk (read from the host, not mounted): the identity and the marker.
    assert_eq!(
        env.state_file("enroll/node-id").as_deref(),
        Some("client1\n")
    );
    assert!(env.state_file("scriptlets/010-once/done").is_some());

    // Same disk, same (spent) token still offered: no `once` scriptlet, no new enrollment.
    let mut vm = env.boot_spec(spec);
    let again = joins(&mut vm, env.vpn(), cluster, "vnode");
    let r = &again.run;
    assert_eq!(r.count("IDHAL-TEST once-ran"), 0, "{:?}", r.lines);
    assert_eq!(r.count("running 010-once"), 0, "{:?}", r.lines);
    assert_eq!(
        r.count("already enrolled as client1 (10.134.2.2)"),
        1,
        "{:?}",
        r.lines
    );
    assert_eq!(r.count("enrolling at "), 0, "{:?}", r.lines);
    assert_eq!(again.joined, first.joined, "same id and address");
    assert_eq!(again.resource["resource_id"], first.resource["resource_id"]);
    assert_eq!(cluster.resources(&first.host).len(), 1, "never a duplicate");
    assert_eq!(env.ca.nodes().len(), 1);
    assert_eq!(env.ca.tokens()[0]["used"], 1);
    let t = Instant::now();
    vm.poweroff();
    leaves(env.vpn(), cluster, &again, t);
}

#[test]
fn vm_revoked_node_is_dropped_at_once_and_cannot_reconnect() {
    let Some((mut env, cluster)) = setup("revoke", "10.134.4.0/24") else {
        return;
    };
    let (_, token) = env.token("vnode", &[]);
    let mut vm = env.boot_spec(spec_with_token(&env, &token));
    let m = joins(&mut vm, env.vpn(), cluster, "vnode");
    let node = m.joined.node.as_str();
    let connect = format!("idhal hook client-connect: {node} ");
    assert_eq!(env.vpn().count(&connect), 1);

    let t = Instant::now();
    let out = env.ca.idhal(&["revoke", node]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("dropped by the OpenVPN server"), "{said}");
    let absent = leaves(env.vpn(), cluster, &m, t);
    // The node's OpenVPN tries again (every `connect-retry` MAX, 2 s); the CRL refuses its certificate.
    let vpn = env.vpn();
    idhal_qemu_tests::wait_until("a refused reconnection", Limits::ABSENT, || {
        (vpn.count("certificate revoked") > 0).then_some(())
    });
    let refused_after = t.elapsed();
    // It stays out across its next reconnections (a condition, not a fixed watch): until the
    // server has refused it three more times, it is Absent at every look and the hook never
    // admitted it again.
    let first = vpn.count("certificate revoked");
    let watch = Instant::now();
    let refusals = idhal_qemu_tests::wait_until(
        "three more refused reconnections",
        Limits::REVOKED_WATCH,
        || {
            let res = cluster.resources(&m.host);
            assert_eq!(res.len(), 1);
            assert_eq!(
                res[0]["state"], "Absent",
                "the revoked node came back: {res:?}"
            );
            assert_eq!(vpn.count(&connect), 1, "{}", vpn.log_text());
            let n = vpn.count("certificate revoked");
            (n >= first + 3).then_some(n)
        },
    );
    eprintln!(
        "FIGURE revoke: idhal revoke to Absent in OAR {:.2} s, first refused reconnection {:.2} s, \
         {refusals} refused in {:.0} s",
        absent.as_secs_f64(),
        refused_after.as_secs_f64(),
        (refused_after + watch.elapsed()).as_secs_f64()
    );
    let nodes = env.ca.nodes();
    assert!(!nodes[0]["revoked_at"].is_null(), "{nodes:?}");
    vm.kill();
}

#[test]
fn vm_two_nodes_at_once_get_distinct_ids_addresses_and_resources() {
    let Some((mut env, cluster)) = setup("twonodes", "10.134.5.0/24") else {
        return;
    };
    // One token, two uses: enrollment is one transaction, so each use makes one node.
    let (_, token) = env.token("vnode", &["--uses", "2"]);
    let spec1 = spec_with_token(&env, &token);
    let mut spec2 = spec1.clone();
    spec2.disk = env.new_disk("state2.img");
    let mut vm1 = env.boot_spec(spec1);
    let mut vm2 = env.boot_spec(spec2);
    // Watched in parallel, so each figure is that VM's own.
    let vpn = env.vpn();
    let (m1, m2) = std::thread::scope(|s| {
        let a = s.spawn(|| joins(&mut vm1, vpn, cluster, "vnode"));
        let b = s.spawn(|| joins(&mut vm2, vpn, cluster, "vnode"));
        (a.join(), b.join())
    });
    let (m1, m2) = match (m1, m2) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => std::panic::resume_unwind(e),
    };
    let mut ids = [m1.joined.node.clone(), m2.joined.node.clone()];
    ids.sort();
    assert_eq!(ids, ["client1", "client2"]);
    assert_ne!(m1.joined.address, m2.joined.address);
    assert_ne!(m1.resource["resource_id"], m2.resource["resource_id"]);
    assert_eq!(env.ca.nodes().len(), 2);
    assert_eq!(env.ca.tokens()[0]["used"], 2);
    let t = Instant::now();
    vm1.poweroff();
    vm2.poweroff();
    for m in [m1, m2] {
        leaves(vpn, cluster, &m, t);
    }
}

/// bootstrap/dist/050-direct-paths.sh.example, with the path switch's log on the console (the
/// test times its transitions there) instead of `peers/log`.
fn direct_scriptlet() -> String {
    let shipped = include_str!("../../bootstrap/dist/050-direct-paths.sh.example");
    let log = "LOG=${IDHAL_DIRECT_LOG:-$P/log}";
    assert!(shipped.contains(log), "the scriptlet's log line moved");
    shipped.replacen(log, "LOG=/dev/console", 1)
}

/// The timings the server hands out in the test (`[peers]`): a short refresh, so the first node
/// learns about the second within seconds, and revocation shows within the test.
const PEERS_REFRESH: u64 = 3;
const PEERS_KEEPALIVE: u64 = 1;
const PEERS_FALLBACK: u64 = 3;

/// Runs `cmd` in the guest; panics (with the output) unless it exits 0.
fn sh(vm: &mut Vm, cmd: &str) -> String {
    let (code, out) = vm
        .sh(cmd, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code, 0, "{}: `{cmd}` failed:\n{out}", vm.name);
    out
}

/// Waits until the console has at least `n` lines containing `needle`; returns when (host).
fn wait_count(vm: &mut Vm, needle: &str, n: usize, timeout: Duration) -> Instant {
    vm.wait(&format!("{n} × {needle:?}"), timeout, |c| {
        (c.lines().iter().filter(|l| l.contains(needle)).count() >= n).then_some(())
    });
    Instant::now()
}

/// busybox ping's summary: (received, average round trip in ms).
fn ping_summary(out: &str) -> (u64, f64) {
    let received = out
        .lines()
        .find_map(|l| l.split_once(" packets received"))
        .and_then(|(l, _)| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no packets line in:\n{out}"));
    let avg = out
        .lines()
        .find_map(|l| l.split_once("min/avg/max = "))
        .and_then(|(_, v)| v.split('/').nth(1)?.parse().ok())
        .unwrap_or(f64::NAN);
    (received, avg)
}

/// Bytes OpenVPN moved for `node` (received from it + sent to it), from the management
/// interface, now.
fn tunnel_bytes(env: &Env, node: &str) -> u64 {
    let pw = env.ca.state.join("projects/default/management.pw");
    let clients = env.vpn().client_bytes(&pw);
    clients
        .iter()
        .find(|(cn, _, _)| cn == node)
        .map(|(_, rx, tx)| rx + tx)
        .unwrap_or_else(|| panic!("{node} is not connected: {clients:?}"))
}

/// `wget`s `to`'s OpenVPN binary 4 times from its busybox httpd (port 8000, serving
/// /usr/sbin: `sh` requests may not write big files) through whatever path `from` has to it;
/// returns MiB/s (guest clock).
fn transfer(from: &mut Vm, to_addr: &str, bytes: u64) -> f64 {
    let out = sh(
        from,
        &format!(
            "s=$(cut -d' ' -f1 /proc/uptime); for i in 1 2 3 4; do \
             wget -q -O /dev/null http://{to_addr}:8000/openvpn || exit 1; done; \
             echo \"took $s $(cut -d' ' -f1 /proc/uptime)\""
        ),
    );
    let t: Vec<f64> = out
        .lines()
        .find_map(|l| l.strip_prefix("took "))
        .unwrap_or_else(|| panic!("{out}"))
        .split(' ')
        .map(|v| v.parse().unwrap())
        .collect();
    (4 * bytes) as f64 / f64::from(1 << 20) / (t[1] - t[0]).max(0.01)
}

/// Issue 11 end to end: two vnodes with a LAN segment between them enroll, come up Alive, and
/// run the shipped direct-paths scriptlet from their signed manifest: each registers its
/// WireGuard key with `POST /peers` (signed by its enrollment key) through
/// `idhal-bootstrap peers`, gets the other in the signed list, and node-to-node traffic goes
/// over WireGuard: OpenVPN's per-client byte counters stand still during 1,000 pings between
/// their VPN addresses. The LAN is cut: traffic falls back through the tunnel (OpenVPN
/// `client-to-client`) with no manual step, and comes back. One node is revoked: the other drops
/// it as a peer within the refresh interval, and the revoked one, refused, drops every peer when
/// its last verified list expires (3 × refresh).
#[test]
fn vm_direct_paths_between_two_nodes_go_over_wireguard_and_fall_back_to_the_tunnel() {
    let Some(cluster) = Cluster::shared() else {
        return;
    };
    let mut env = Env::with(
        "direct",
        EnvOptions {
            server_toml: format!(
                "{}[peers]\nrefresh_secs = {PEERS_REFRESH}\nkeepalive_secs = {PEERS_KEEPALIVE}\n\
                 fallback_secs = {PEERS_FALLBACK}\n",
                cluster.server_toml()
            ),
            pool: Some("10.134.6.0/24".into()),
            vpn: true,
            openvpn_toml: "client_to_client = true\n".into(),
        },
    )
    .expect("the cluster runs, so does the VM harness");
    env.project.scriptlet("000-enroll", enroll::SCRIPTLET);
    env.project
        .scriptlet("050-direct-paths", &direct_scriptlet());
    env.project
        .params
        .push("direct-networks=192.168.77.0/24".into());
    assert_eq!(env.project.sign(&[]), 1);

    let (_, token) = env.token("vnode", &["--uses", "2"]);
    let mut spec = spec_with_token(&env, &token);
    spec.cmdline.push("idhal.lan=192.168.77.11/24".into());
    spec.lan = Some(idhal_qemu_tests::LanNic::listen());
    let mut vm_a = env.boot_spec(spec);
    let mut spec = spec_with_token(&env, &token);
    spec.disk = env.new_disk("b.img");
    spec.cmdline.push("idhal.lan=192.168.77.12/24".into());
    spec.lan = Some(idhal_qemu_tests::LanNic::connect_to(&mut vm_a).unwrap());
    let mut vm_b = env.boot_spec(spec);
    let vpn = env.vpn();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| joins(&mut vm_a, vpn, cluster, "vnode"));
        let b = s.spawn(|| joins(&mut vm_b, vpn, cluster, "vnode"));
        (a.join(), b.join())
    });
    let (a, b) = match (a, b) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => std::panic::resume_unwind(e),
    };
    let both_alive = Instant::now();
    for m in [&a, &b] {
        assert_eq!(m.run.exit, 0, "{}", m.run.last_message());
        assert_eq!(
            m.run.scriptlet_state("050-direct-paths").as_deref(),
            Some("done"),
            "{}",
            m.run.last_message()
        );
    }
    let (id_a, id_b) = (a.joined.node.clone(), b.joined.node.clone());
    let (vpn_a, vpn_b) = (a.joined.address.clone(), b.joined.address.clone());

    // Both registered (the server's view), and each gets the other as a direct peer.
    let up_a = format!("idhal-direct: direct up {id_b}");
    let up_b = format!("idhal-direct: direct up {id_a}");
    let limit = Duration::from_secs(60);
    let t_a = wait_count(&mut vm_a, &up_a, 1, limit);
    let t_b = wait_count(&mut vm_b, &up_b, 1, limit);
    eprintln!(
        "FIGURE direct: both Alive to the direct path up {:.2} s ({id_a}) / {:.2} s ({id_b}) wall \
         (refresh {PEERS_REFRESH} s, keepalive {PEERS_KEEPALIVE} s)",
        t_a.saturating_duration_since(both_alive).as_secs_f64(),
        t_b.saturating_duration_since(both_alive).as_secs_f64()
    );
    let nodes = env.ca.nodes();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    assert!(
        nodes.iter().all(|n| n["wg_registered_at"].is_u64()),
        "{nodes:?}"
    );
    let routes = sh(&mut vm_a, "ip route show dev wg0; wg show wg0 allowed-ips");
    assert!(
        routes.contains(&format!("{vpn_b} "))
            && routes.contains(&format!("src {vpn_a}"))
            && routes.contains(&format!("{vpn_b}/32")),
        "{routes}"
    );

    // 1,000 pings between the VPN addresses: none through the server.
    let before = (tunnel_bytes(&env, &id_a), tunnel_bytes(&env, &id_b));
    let direct = sh(&mut vm_a, &format!("ping -q -c 1000 -i 0.01 -W 5 {vpn_b}"));
    let after = (tunnel_bytes(&env, &id_a), tunnel_bytes(&env, &id_b));
    let (received, rtt_direct) = ping_summary(&direct);
    let delta = |after: u64, before: u64| {
        after
            .checked_sub(before)
            .expect("OpenVPN's counters went back: a node reconnected")
    };
    let moved = (delta(after.0, before.0), delta(after.1, before.1));
    eprintln!(
        "FIGURE direct: 1,000 pings {id_a}→{id_b} over WireGuard: {received} answered, RTT avg \
         {rtt_direct:.3} ms; bytes through the OpenVPN server meanwhile: {} ({id_a}), {} ({id_b})",
        moved.0, moved.1
    );
    assert!(received >= 990, "{direct}");
    // OpenVPN's own keepalives (1 s) pass meanwhile: a few hundred bytes. Through the server,
    // the pings alone would be 1,000 × 2 × 84 bytes and more for each node.
    assert!(
        moved.0 < 16_384 && moved.1 < 16_384,
        "node-to-node traffic went through the server: {moved:?}"
    );
    let served: u64 = sh(
        &mut vm_b,
        "httpd -p 8000 -h /usr/sbin && wc -c < /usr/sbin/openvpn",
    )
    .trim()
    .parse()
    .unwrap();
    let mibs_direct = transfer(&mut vm_a, &vpn_b, served);

    // Cut the LAN: with a ping running, the path falls back to the tunnel by itself.
    sh(
        &mut vm_a,
        &format!("ping -i 0.1 -c 300 -W 1 {vpn_b} > /tmp/cut.ping 2>&1 &"),
    );
    let down_a = format!("idhal-direct: direct down {id_b}");
    let cut = Instant::now();
    vm_a.set_link(idhal_qemu_tests::vm::LAN, false).unwrap();
    let down_b = format!("idhal-direct: direct down {id_a}");
    // Both ends must fall back: until b does, its answers still go to wg0 (QEMU drops the
    // segment's frames both ways, so b stops hearing a at the same time).
    let fell_a = wait_count(&mut vm_a, &down_a, 1, limit);
    let fell_b = wait_count(&mut vm_b, &down_b, 1, limit);
    let fallback = fell_a.max(fell_b) - cut;
    let moving = tunnel_bytes(&env, &id_a);
    let through = sh(&mut vm_a, &format!("ping -c 20 -i 0.1 -W 2 {vpn_b}"));
    let (received, rtt_tunnel) = ping_summary(&through);
    assert!(received >= 18, "no fallback through the tunnel:\n{through}");
    assert!(
        delta(tunnel_bytes(&env, &id_a), moving) >= 20 * 84,
        "the fallback pings did not go through the server"
    );
    let mibs_tunnel = transfer(&mut vm_a, &vpn_b, served);
    // The running ping: how many of its packets the cut cost.
    let ping_log = wait_ping_done(&mut vm_a);
    let (got, _) = ping_summary(&ping_log);
    eprintln!(
        "FIGURE direct: LAN cut to the /32 off wg0 on both nodes {:.2} s wall ({id_a} {:.2} s; \
         keepalive {PEERS_KEEPALIVE} s, fallback {PEERS_FALLBACK} s); a 10/s ping lost {} of 300 \
         meanwhile",
        fallback.as_secs_f64(),
        (fell_a - cut).as_secs_f64(),
        300 - got
    );
    eprintln!(
        "FIGURE direct: RTT avg direct {rtt_direct:.3} ms, through the tunnel {rtt_tunnel:.3} ms; \
         HTTP transfer ({served} B × 4) direct {mibs_direct:.2} MiB/s, through the tunnel \
         {mibs_tunnel:.2} MiB/s (TCG guests)"
    );
    assert!(
        got >= 200,
        "the fallback took too long or never came:\n{ping_log}"
    );

    // The LAN comes back: the direct path too.
    let on = Instant::now();
    vm_a.set_link(idhal_qemu_tests::vm::LAN, true).unwrap();
    let back = wait_count(&mut vm_a, &up_a, 2, limit).max(wait_count(&mut vm_b, &up_b, 2, limit));
    eprintln!(
        "FIGURE direct: LAN back to the /32 on wg0 on both nodes {:.2} s wall",
        (back - on).as_secs_f64()
    );

    // Revoke b: a drops it as a peer within the refresh interval; b drops every peer.
    let key_b = sh(&mut vm_b, "cat /var/lib/idhal/peers/wg.pub")
        .trim()
        .to_string();
    let revoked = Instant::now();
    env.ca.ok(&["revoke", &id_b]);
    let removed = wait_count(
        &mut vm_a,
        &format!("idhal-direct: peer {key_b} removed: not in the list"),
        1,
        limit,
    );
    eprintln!(
        "FIGURE direct: revoke to the peer dropped by {id_a} {:.2} s wall (refresh {PEERS_REFRESH} s)",
        (removed - revoked).as_secs_f64()
    );
    let peers_a = sh(&mut vm_a, "wg show wg0 peers; ip route show dev wg0");
    assert!(
        !peers_a.contains(&key_b) && !peers_a.contains(&vpn_b),
        "{peers_a}"
    );
    // b's own exchanges are refused (410, unsigned: its files stay as they were); its last
    // verified list expires after 3 × refresh and it drops every peer by itself.
    let key_a = sh(&mut vm_a, "cat /var/lib/idhal/peers/wg.pub")
        .trim()
        .to_string();
    wait_count(
        &mut vm_b,
        "idhal-direct: no verified peer list for",
        1,
        limit,
    );
    let expired = wait_count(
        &mut vm_b,
        &format!("idhal-direct: peer {key_a} removed: not in the list"),
        1,
        limit,
    );
    eprintln!(
        "FIGURE direct: revoke to every peer dropped by the revoked {id_b} {:.2} s wall (its list \
         expires after 3 × refresh)",
        (expired - revoked).as_secs_f64()
    );
    let peers_b = sh(
        &mut vm_b,
        "wg show wg0 peers | wc -l; ip route show dev wg0 | wc -l",
    );
    assert_eq!(
        peers_b.split_whitespace().collect::<Vec<_>>(),
        ["0", "0"],
        "{peers_b}"
    );
    vm_a.kill();
    vm_b.kill();
}

/// The output of the ping started in the background before the cut, once it ended.
fn wait_ping_done(vm: &mut Vm) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = sh(vm, "cat /tmp/cut.ping");
        if out.contains("packets received") {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "the background ping never ended:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
