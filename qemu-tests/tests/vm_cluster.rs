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
