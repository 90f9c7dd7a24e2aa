//! Issue 11, the rig and the path switch: two test vnodes with a second NIC on a LAN segment
//! between them (QEMU `-netdev socket` over 127.0.0.1), the QEMU monitor's `set_link`, a shell
//! in the guest (`Vm::sh`); WireGuard between them, and
//! bootstrap/dist/050-direct-paths.sh.example's switch giving each the other's VPN /32 on wg0
//! while packets arrive, and taking it away when the segment is cut.
//! The test plays the agent (it writes `peers/wg.conf` and `peers/list` in the agent's format)
//! and the enrollment (the "VPN address" on lo, `enroll/address`); no server, no OpenVPN.
use idhal_image_build as ib;
use idhal_qemu_tests::console::READY;
use idhal_qemu_tests::vm::LAN;
use idhal_qemu_tests::{env_or_skip, LanNic, Limits, Vm};
use std::time::{Duration, Instant};

const SCRIPTLET: &str = include_str!("../../bootstrap/dist/050-direct-paths.sh.example");
/// Where the test bakes the scriptlet into the guests.
const SCRIPT_PATH: &str = "/etc/idhal-test/050-direct-paths.sh";
/// One `sh` request: each is a few busybox commands.
const SH: Duration = Duration::from_secs(60);
/// The switch's settings in the list the test writes (what the server would send).
const KEEPALIVE: u64 = 1;
const FALLBACK: u64 = 3;
/// Generous: two TCG guests on a busy 2-core machine; the figures are printed, not asserted.
const SWITCH: Duration = Duration::from_secs(60);

/// One of the two nodes: its VM, LAN and VPN addresses, node id, WireGuard public key.
struct Node {
    vm: Vm,
    lan: &'static str,
    vpn: &'static str,
    id: &'static str,
    public: String,
}

/// Runs `cmd` in the guest; panics (with the output) unless it exits 0.
fn sh(vm: &mut Vm, cmd: &str) -> String {
    let (code, out) = vm.sh(cmd, SH).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code, 0, "{}: `{cmd}` failed:\n{out}", vm.name);
    out
}

/// How many console lines of this boot contain `needle`.
fn count(vm: &Vm, needle: &str) -> usize {
    vm.log()
        .lines()
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

/// Waits until the console has at least `n` lines containing `needle`; returns when (host).
fn wait_count(vm: &mut Vm, needle: &str, n: usize, timeout: Duration) -> Instant {
    vm.wait(&format!("{n} × {needle:?}"), timeout, |c| {
        (c.lines().iter().filter(|l| l.contains(needle)).count() >= n).then_some(())
    });
    Instant::now()
}

/// The average of busybox ping's `round-trip min/avg/max = a/b/c ms` line.
fn rtt_avg(out: &str) -> f64 {
    out.lines()
        .find_map(|l| l.split_once("min/avg/max = "))
        .and_then(|(_, v)| v.split('/').nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no round-trip line in:\n{out}"))
}

/// The peer files `idhal-bootstrap peers` writes, as the agent writes them (atomically).
fn play_the_agent(me: &mut Node, peer: &Node) {
    let conf = format!(
        "[Peer]\\nPublicKey = {}\\nEndpoint = {}:51820\\nPersistentKeepalive = {KEEPALIVE}\\n",
        peer.public, peer.lan
    );
    let list = format!(
        "refresh 3600\\nkeepalive {KEEPALIVE}\\nfallback {FALLBACK}\\npeer {} {} {}\\n",
        peer.public, peer.vpn, peer.id
    );
    let d = "/var/lib/idhal/peers";
    sh(
        &mut me.vm,
        &format!(
            "printf '{conf}' > {d}/wg.conf.tmp && mv {d}/wg.conf.tmp {d}/wg.conf && \
             printf '{list}' > {d}/list.tmp && mv {d}/list.tmp {d}/list"
        ),
    );
}

/// Boots two nodes on one LAN segment, the listening side first.
fn two_nodes(env: &mut idhal_qemu_tests::Env) -> (Node, Node) {
    let mut overlay = ib::Overlay::default();
    overlay.file(
        SCRIPT_PATH.trim_start_matches('/'),
        0o755,
        SCRIPTLET.as_bytes().to_vec(),
    );
    let mut spec = env.spec_with(overlay.clone());
    spec.cmdline.push("idhal.lan=192.168.77.11/24".into());
    spec.lan = Some(LanNic::listen());
    let mut a = env.boot_spec(spec);
    let mut spec = env.spec_with(overlay);
    spec.disk = env.new_disk("b.img");
    spec.cmdline.push("idhal.lan=192.168.77.12/24".into());
    spec.lan = Some(LanNic::connect_to(&mut a).unwrap());
    let b = env.boot_spec(spec);
    let node = |vm, lan, vpn, id| Node {
        vm,
        lan,
        vpn,
        id,
        public: String::new(),
    };
    (
        node(a, "192.168.77.11", "10.134.0.11", "client11"),
        node(b, "192.168.77.12", "10.134.0.12", "client12"),
    )
}

#[test]
fn vm_direct_path_goes_over_wireguard_and_falls_back_when_the_lan_is_cut() {
    let mut env = env_or_skip!("direct");
    assert_eq!(env.project.sign(&[]), 1);
    let (mut a, mut b) = two_nodes(&mut env);
    for n in [&mut a, &mut b] {
        n.vm.wait_for(READY, Limits::BOOT);
        let lan = n.vm.wait_for("IDHAL-EVENT lan", Limits::RUN);
        assert!(
            lan.starts_with(&format!("IDHAL-EVENT lan={}/24 ", n.lan)),
            "{lan}"
        );
        // What enrollment and OpenVPN would have done: the node's VPN address, here on lo.
        sh(
            &mut n.vm,
            &format!(
                "ip addr add {0}/32 dev lo && mkdir -p /var/lib/idhal/enroll && \
                 echo {0} > /var/lib/idhal/enroll/address",
                n.vpn
            ),
        );
        let started = Instant::now();
        let out = sh(
            &mut n.vm,
            &format!(
                "IDHAL_STATE_DIR=/var/lib/idhal IDHAL_PARAM_DIRECT_NETWORKS=192.168.77.0/24,10.1.2/8 \
                 IDHAL_DIRECT_LOG=/dev/console sh {SCRIPT_PATH}"
            ),
        );
        assert!(out.contains("path switch started"), "{out}");
        assert!(
            out.contains("direct-networks: 10.1.2/8 is not A.B.C.D/N (N 1-32); ignored"),
            "{out}"
        );
        eprintln!(
            "FIGURE {}: scriptlet (key, wg0, daemon) {:.2} s wall",
            n.vm.name,
            started.elapsed().as_secs_f64()
        );
        let files = sh(
            &mut n.vm,
            "cd /var/lib/idhal/peers && stat -c '%a %n' wg.key && cat wg.pub endpoints",
        );
        let lines: Vec<&str> = files.lines().collect();
        assert_eq!(lines[0], "600 wg.key", "{files}");
        assert_eq!(lines[1].len(), 44, "{files}");
        // Only the LAN address is inside direct-networks (not user-net's 10.0.2.15).
        assert_eq!(&lines[2..], [format!("{}:51820", n.lan)], "{files}");
        n.public = lines[1].to_string();
    }

    // The test plays the agent: each node learns the other as a peer.
    let t0 = Instant::now();
    play_the_agent(&mut a, &b);
    play_the_agent(&mut b, &a);
    let up_a = format!("idhal-direct: direct up {}", b.id);
    let up_b = format!("idhal-direct: direct up {}", a.id);
    let down_a = format!("idhal-direct: direct down {}", b.id);
    let when = wait_count(&mut a.vm, &up_a, 1, SWITCH);
    wait_count(&mut b.vm, &up_b, 1, SWITCH);
    eprintln!(
        "FIGURE direct: peer files written to {} up on {} {:.2} s wall",
        b.id,
        a.vm.name,
        (when - t0).as_secs_f64()
    );
    let state = sh(
        &mut a.vm,
        "ip route show dev wg0; wg show wg0 allowed-ips; wg show wg0 latest-handshakes",
    );
    let route = state.lines().next().unwrap_or_default();
    assert!(
        route.starts_with(&format!("{} ", b.vpn)) && route.contains(&format!("src {}", a.vpn)),
        "{state}"
    );
    assert!(
        state.contains(&format!("{} {}/32", b.public, b.vpn)),
        "{state}"
    );
    let wg = sh(&mut a.vm, &format!("ping -c 10 -i 0.2 -W 2 {}", b.vpn));
    let lan = sh(&mut a.vm, &format!("ping -c 10 -i 0.2 -W 2 {}", b.lan));
    eprintln!(
        "FIGURE direct: RTT avg over wg0 {:.3} ms, over the bare LAN {:.3} ms (10 pings, TCG)",
        rtt_avg(&wg),
        rtt_avg(&lan)
    );

    // Cut the segment on a's side: both lose it (QEMU drops frames both ways).
    a.vm.set_link(LAN, false).unwrap();
    let cut = Instant::now();
    let gone = wait_count(&mut a.vm, &down_a, 1, SWITCH);
    eprintln!(
        "FIGURE direct: LAN cut to the /32 off wg0 {:.2} s wall (keepalive {KEEPALIVE} s, fallback {FALLBACK} s)",
        (gone - cut).as_secs_f64()
    );
    let state = sh(&mut a.vm, "ip route show dev wg0; wg show wg0 allowed-ips");
    assert!(!state.contains(b.vpn), "{state}");
    assert!(state.contains(&format!("{} (none)", b.public)), "{state}");
    let (code, out) = a.vm.sh(&format!("ping -c 1 -W 2 {}", b.vpn), SH).unwrap();
    assert_ne!(code, 0, "no path left, yet:\n{out}");

    // And back.
    a.vm.set_link(LAN, true).unwrap();
    let on = Instant::now();
    // Both ends: until b is up again, its answers to a still take the (here absent) tunnel.
    let back = wait_count(&mut a.vm, &up_a, 2, SWITCH).max(wait_count(&mut b.vm, &up_b, 2, SWITCH));
    eprintln!(
        "FIGURE direct: LAN back to the /32 on wg0 on both nodes {:.2} s wall",
        (back - on).as_secs_f64()
    );
    sh(&mut a.vm, &format!("ping -c 3 -W 2 {}", b.vpn));
    assert_eq!(count(&a.vm, &up_a), 2);
    assert!(a.vm.set_link("no-such-nic", false).is_err());
}

/// The boot figure of the test vnode: QEMU start to `IDHAL-EVENT ready` (printed, never
/// asserted), and the size of the base initramfs.
#[test]
fn vm_direct_boot_to_ready_figure() {
    let mut env = env_or_skip!("readyfig");
    assert_eq!(env.project.sign(&[]), 1);
    let size = std::fs::metadata(&env.shared.base.initramfs).unwrap().len();
    let mut vm = env.boot();
    let line = vm.wait_for(READY, Limits::BOOT);
    eprintln!(
        "FIGURE boot: initramfs {size} B, QEMU start to ready {:.2} s wall ({line})",
        vm.started.elapsed().as_secs_f64()
    );
    vm.kill();
}

/// What the rig gets from outside its control: a malformed `idhal.lan=`, commands whose output
/// imitates the frame or never ends, a command that is not one line or outlives the harness's
/// deadline, a monitor id that does not exist or smuggles a second command.
#[test]
fn vm_direct_rig_refuses_hostile_input() {
    let mut env = env_or_skip!("righostile");
    assert_eq!(env.project.sign(&[]), 1);
    let mut spec = env.spec();
    spec.cmdline.push("idhal.lan=192.168.77.300/24".into());
    let mut vm = env.boot_spec(spec);
    vm.wait_for(READY, Limits::BOOT);
    assert!(vm
        .log()
        .find(|l| l.starts_with("IDHAL-EVENT lan-failed"))
        .is_some());
    assert!(vm
        .log()
        .find(|l| l.starts_with("IDHAL-EVENT lan="))
        .is_none());

    // Output that imitates the frame (after a CR, as a terminal would show it) is content.
    let (code, out) = vm
        .sh(
            "printf 'x\\rIDHAL-SH 1 exit=0\\n\\tIDHAL-SH 1 | fake\\n'; exit 7",
            SH,
        )
        .unwrap();
    assert_eq!(code, 7, "{out}");
    assert_eq!(out, "x?IDHAL-SH 1 exit=0\n IDHAL-SH 1 | fake");
    // An endless writer is cut at 64 KiB (SIGXFSZ), and says so.
    let (code, out) = vm.sh("yes 0123456789abcdef", SH).unwrap();
    assert_eq!(code, 153);
    assert!(
        out.ends_with("[sh: output truncated at 64 KiB]"),
        "{}",
        &out[out.len() - 80..]
    );
    assert_eq!(out.lines().count(), 65536 / 17 + 1 + 1);
    // Empty output, and a request that is not one line.
    assert_eq!(vm.sh("true", SH).unwrap(), (0, String::new()));
    assert!(vm
        .sh("echo a\necho b", SH)
        .unwrap_err()
        .contains("one line"));
    assert!(vm
        .sh(&"x".repeat(5000), SH)
        .unwrap_err()
        .contains("one line"));
    assert!(vm
        .set_link("no-such-nic", false)
        .unwrap_err()
        .contains("not found"));
    assert!(vm.set_link("lan\ninfo", false).is_err());
    // A command that outlives the harness's deadline: an error, and the next request still
    // gets its own output, not the late one's.
    let late = vm.sh("sleep 3; echo late", Duration::from_millis(300));
    assert!(late.unwrap_err().contains("no exit code"));
    assert_eq!(vm.sh("echo next", SH).unwrap(), (0, "next".to_string()));
    vm.kill();
}

/// The switch reads a peer list with malformed and duplicate lines (the agent validates it, but
/// the switch acts on it as root); then, on the same guest, `switch_hardening`.
#[test]
fn vm_direct_switch_ignores_malformed_peer_list_lines() {
    let mut env = env_or_skip!("directlist");
    assert_eq!(env.project.sign(&[]), 1);
    let mut overlay = ib::Overlay::default();
    overlay.file(
        SCRIPT_PATH.trim_start_matches('/'),
        0o755,
        SCRIPTLET.as_bytes().to_vec(),
    );
    let mut vm = env.boot_spec(env.spec_with(overlay));
    vm.wait_for(READY, Limits::BOOT);

    // The switch reads a list with bad lines: it ignores them, one log line each, and only
    // when the list changes; the good peer is on wg0, without a route (no packet from it yet).
    let good = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let list = format!(
        "refresh 0\\nkeepalive x\\npeer {good} 10.134.0.12 client12\\n\
         peer {good} 10.134.0.13 twice\\npeer short 10.134.0.14 c\\n\
         peer BAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= 10.134.0.300 c\\n\
         peer CAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= 10.134.0.12 sameaddr\\n\
         peer DAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= 10.134.0.15 bad;id\\n"
    );
    let conf = format!("[Peer]\\nPublicKey = {good}\\nPersistentKeepalive = 1\\n");
    let env_vars = "IDHAL_STATE_DIR=/var/lib/idhal IDHAL_PARAM_DIRECT_NETWORKS=192.168.77.0/24";
    let out = vm
        .sh(
            &format!(
                "{env_vars} sh {SCRIPT_PATH} setup && d=/var/lib/idhal/peers && \
                 printf '{conf}' > $d/wg.conf && printf '{list}' > $d/list && \
                 {env_vars} sh {SCRIPT_PATH} apply-once && {env_vars} sh {SCRIPT_PATH} apply-once \
                 && wg show wg0 allowed-ips && ip route show dev wg0"
            ),
            SH,
        )
        .unwrap();
    assert_eq!(out.0, 0, "{}", out.1);
    let bad: Vec<&str> = out.1.lines().filter(|l| l.contains("malformed")).collect();
    assert_eq!(bad.len(), 7, "{}", out.1);
    for n in [1, 2, 4, 5, 6, 7, 8] {
        assert!(
            out.1.contains(&format!("list line {n} is malformed")),
            "line {n}: {}",
            out.1
        );
    }
    assert!(out.1.contains(&format!("{good} (none)")), "{}", out.1);
    assert!(!out.1.contains("10.134.0.12 "), "{}", out.1);
    // What one pass costs under TCG (one peer on wg0, nothing to change), printed.
    let (code, out) = vm
        .sh(
            &format!(
                "s=$(cut -d' ' -f1 /proc/uptime); for i in 1 2 3 4 5 6 7 8 9 10; do \
                 {env_vars} sh {SCRIPT_PATH} apply-once || exit 1; done; \
                 echo \"$s $(cut -d' ' -f1 /proc/uptime)\""
            ),
            SH,
        )
        .unwrap();
    assert_eq!(code, 0, "{out}");
    let t: Vec<f64> = out
        .lines()
        .last()
        .unwrap()
        .split(' ')
        .map(|v| v.parse().unwrap())
        .collect();
    eprintln!(
        "FIGURE switch: one apply-once pass {:.0} ms of guest time (TCG, mean of 10)",
        (t[1] - t[0]) * 100.0
    );
    switch_hardening(&mut vm, env_vars, good);

    // While the switch runs, a second pass would share its files: refused.
    let started = vm.sh(&format!("{env_vars} sh {SCRIPT_PATH}"), SH).unwrap();
    assert_eq!(started.0, 0, "{}", started.1);
    let (code, out) = vm
        .sh(&format!("{env_vars} sh {SCRIPT_PATH} apply-once"), SH)
        .unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("apply-once is for when it does not"), "{out}");
    vm.kill();
}

/// Issue 11's review, on one guest with wg0 set up and no switch running: rp_filter, endpoints,
/// `/0`, IPv6 endpoints, roaming kept, one-way peers, the list's lifetime. Every finding is
/// collected, so one run against an old scriptlet shows each that fails. Every endpoint here is
/// on the guest's loopback or never dialled (no keepalive): nothing leaves the guest.
fn switch_hardening(vm: &mut Vm, env_vars: &str, good: &str) {
    let mut wrong: Vec<String> = Vec::new();
    let mut check = |ok: bool, what: &str, out: &str| {
        if !ok {
            wrong.push(format!("{what}:\n{out}"));
        }
    };
    let apply = format!("{env_vars} sh {SCRIPT_PATH} apply-once");
    let d = "/var/lib/idhal/peers";
    let conf = "/proc/sys/net/ipv4/conf";

    // rp_filter: loose on wg0 and on a tun device made after setup (OpenVPN's, recreated at
    // each reconnect; a wireguard link named tun0 stands in for it), `all` untouched.
    let all = sh(vm, &format!("cat {conf}/all/rp_filter"));
    let out = sh(
        vm,
        &format!(
            "echo 0 > {conf}/all/rp_filter; ip link add tun0 type wireguard && {apply} && \
             cat {conf}/all/rp_filter {conf}/wg0/rp_filter {conf}/tun0/rp_filter; \
             echo {all} > {conf}/all/rp_filter; ip link del tun0"
        ),
    );
    let last3: Vec<&str> = out.lines().rev().take(3).collect();
    check(last3 == ["2", "2", "0"], "rp_filter all, wg0, tun0", &out);

    // One address on two interfaces is one endpoint; a /0 in direct-networks is refused.
    let out = sh(
        vm,
        &format!(
            "for x in x0 x1; do ip link add $x type wireguard && \
             ip addr add 192.168.77.11/24 dev $x || exit 1; done; \
             IDHAL_STATE_DIR=/var/lib/idhal IDHAL_PARAM_DIRECT_NETWORKS=192.168.77.0/24,0.0.0.0/0 \
             sh {SCRIPT_PATH} setup; echo rc=$?; cat {d}/endpoints; ip link del x0; ip link del x1"
        ),
    );
    check(
        out.contains("direct-networks: 0.0.0.0/0 is not A.B.C.D/N (N 1-32); ignored"),
        "/0 refused",
        &out,
    );
    check(
        out.ends_with("rc=0\n192.168.77.11:51820"),
        "endpoints: the address once, user-net's not at all",
        &out,
    );

    // A one-way peer: wg1 (same guest) initiates to wg0 with a preshared key wg0 lacks, so
    // wg0's rx grows from its initiations while no handshake ever completes.
    let k17 = sh(
        vm,
        "umask 077; wg genkey > /tmp/k1 && wg genpsk > /tmp/psk && \
         ip link add wg1 type wireguard && wg set wg1 private-key /tmp/k1 listen-port 51821 \
         peer $(wg show wg0 public-key) preshared-key /tmp/psk endpoint 127.0.0.1:51820 \
         persistent-keepalive 1 && ip link set wg1 up && wg pubkey < /tmp/k1",
    );
    let e = "EAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let list = format!(
        "refresh 3600\\nkeepalive 1\\nfallback 10\\npeer {good} 10.134.0.12 client12\\n\
         peer {e} 10.134.0.16 client16\\npeer {k17} 10.134.0.17 client17\\n"
    );
    let peer = |k: &str, ep: &str, ka: u8| {
        format!("\\n[Peer]\\nPublicKey = {k}\\n{ep}PersistentKeepalive = {ka}\\n")
    };
    let wg_conf = format!(
        "# idhal-bootstrap peers for client11\\n{}{}",
        peer(good, "Endpoint = [::1]:51899\\n", 0),
        peer(e, "Endpoint = 127.0.0.16:51899\\n", 0),
    );
    let write = |conf: &str| {
        format!(
            "printf '{conf}' > {d}/wg.conf.tmp && mv {d}/wg.conf.tmp {d}/wg.conf && \
             printf '{list}' > {d}/list.tmp && mv {d}/list.tmp {d}/list"
        )
    };
    // IPv6: `[v6]:port` is an endpoint too.
    let out = sh(
        vm,
        &format!("{} && {apply} && wg show wg0 endpoints", write(&wg_conf)),
    );
    check(
        out.contains(&format!("{good} [::1]:51899")),
        "IPv6 endpoint applied",
        &out,
    );
    // WireGuard roams client16 to another address; the same files again, then a list with one
    // more peer (a new wg.conf): the roamed endpoint stays.
    let wg_conf2 = format!("{wg_conf}{}", peer(&k17, "", 1));
    let out = sh(
        vm,
        &format!(
            "wg set wg0 peer {e} endpoint 127.0.0.3:51899 && {w1} && {apply} && {w2} && \
             {apply} && wg show wg0 endpoints",
            w1 = write(&wg_conf),
            w2 = write(&wg_conf2)
        ),
    );
    check(
        out.contains(&format!("{e} 127.0.0.3:51899")),
        "roaming kept across refreshes and a changed wg.conf",
        &out,
    );
    // Passes until wg1's initiations have grown wg0's rx for it between two of them.
    let (code, out) = vm
        .sh(
            &format!(
                "rx() {{ wg show wg0 transfer | awk -v k={k17} '$1 == k {{ print $2 }}'; }}; \
                 for i in $(seq 1 60); do r=$(rx); {apply} >> /tmp/hs.log 2>&1 || exit 1; \
                 sleep 0.5; [ \"$(rx)\" != \"$r\" ] && [ \"$(rx)\" -gt 0 ] && break; done; \
                 {apply} >> /tmp/hs.log 2>&1; cat /tmp/hs.log; echo rx=$(rx); \
                 wg show wg0 latest-handshakes; wg show wg0 allowed-ips; ip route show dev wg0"
            ),
            SH,
        )
        .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("{k17} 0\n")) && !out.contains("rx=0\n"),
        "the one-way setup itself (rx > 0, no handshake):\n{out}"
    );
    check(
        out.contains(&format!("{k17} (none)")) && !out.contains("direct up client17"),
        "a peer that only initiates is not up",
        &out,
    );
    eprintln!(
        "FIGURE switch: one-way peer, {}",
        out.lines().find(|l| l.starts_with("rx=")).unwrap_or("")
    );
    sh(vm, "ip link del wg1");

    // The list's lifetime: 3 × refresh (3 h here) after it was last written, every peer goes,
    // with one log line; a fresh list brings them back.
    let out = sh(
        vm,
        &format!(
            "touch -d @$(($(date +%s) - 10900)) {d}/list && {apply} && {apply} && \
             echo peers=$(wg show wg0 peers | wc -l) && touch {d}/list && {apply} && \
             echo peers=$(wg show wg0 peers | wc -l)"
        ),
    );
    let dropped = out
        .lines()
        .filter(|l| l.contains("idhal-direct: no verified peer list for "))
        .count();
    check(
        dropped == 1 && out.contains("s: every peer dropped\n"),
        "one log line when the list expires",
        &out,
    );
    check(
        out.contains("peers=0\n") && out.ends_with("peers=3"),
        "an expired list drops every peer, a fresh one brings them back",
        &out,
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n---\n"));
}

/// The segment between two guests carries frames, and `set_link` cuts and restores it; a
/// connecting side needs a started listener.
#[test]
fn vm_direct_lan_segment_between_two_guests_and_set_link() {
    let mut env = env_or_skip!("lan");
    assert_eq!(env.project.sign(&[]), 1);
    let mut spec = env.spec();
    spec.cmdline.push("idhal.lan=192.168.77.11/24".into());
    spec.lan = Some(LanNic::listen());
    let mut a = env.boot_spec(spec);
    let mut spec = env.spec();
    spec.disk = env.new_disk("b.img");
    spec.cmdline.push("idhal.lan=192.168.77.12/24".into());
    spec.lan = Some(LanNic::connect_to(&mut a).unwrap());
    let mut b = env.boot_spec(spec);
    assert!(LanNic::connect_to(&mut b)
        .unwrap_err()
        .contains("nothing to connect to"));
    assert!(LanNic::connect_to(&mut a)
        .unwrap_err()
        .contains("has its other end already"));
    for vm in [&mut a, &mut b] {
        vm.wait_for(READY, Limits::BOOT);
    }
    // Until one ping answers (ARP, the other guest still booting), bounded by the guest.
    let ping = |vm: &mut Vm, to: &str| {
        vm.sh(
            &format!(
                "for i in 1 2 3 4 5 6 7 8 9 10; do ping -c 1 -W 1 {to} && exit 0; done; exit 1"
            ),
            SH,
        )
        .unwrap()
    };
    assert_eq!(ping(&mut a, "192.168.77.12").0, 0);
    assert_eq!(ping(&mut b, "192.168.77.11").0, 0);
    a.set_link(LAN, false).unwrap();
    // One side's link off cuts both directions.
    let (code, out) = a.sh("ping -c 2 -W 1 192.168.77.12", SH).unwrap();
    assert_ne!(code, 0, "{out}");
    let (code, out) = b.sh("ping -c 2 -W 1 192.168.77.11", SH).unwrap();
    assert_ne!(code, 0, "{out}");
    a.set_link(LAN, true).unwrap();
    assert_eq!(ping(&mut b, "192.168.77.11").0, 0);
}

/// The way a node gets it: the scriptlet in a signed manifest with its params, run by the agent
/// at boot. The daemon it starts outlives the run, and the agent's next run is not held up.
#[test]
fn vm_direct_scriptlet_from_a_signed_manifest_starts_a_switch_that_outlives_the_run() {
    let mut env = env_or_skip!("directagent");
    env.project.scriptlet("050-direct-paths", SCRIPTLET);
    env.project
        .params
        .push("direct-networks=10.0.2.0/24,192.168.77.0/24".into());
    env.project.params.push("direct-port=51999".into());
    assert_eq!(env.project.sign(&[]), 1);
    let mut vm = env.boot();
    let r = vm.wait_boot_run();
    assert_eq!(r.exit, 0, "{}", r.last_message());
    assert_eq!(
        r.scriptlet_state("050-direct-paths").as_deref(),
        Some("done")
    );
    let out = sh(
        &mut vm,
        "cat /var/lib/idhal/scriptlets/050-direct-paths/log /var/lib/idhal/peers/endpoints; \
         wg show wg0 listen-port; kill -0 $(cat /run/idhal-direct/pid) && echo switch-alive",
    );
    assert!(out.contains("path switch started"), "{out}");
    // user-net's address is this node's only one inside direct-networks here.
    assert!(
        out.contains("\n10.0.2.15:51999\n51999\nswitch-alive"),
        "{out}"
    );
    let again = vm.run_again();
    assert_eq!(again.exit, 0, "{}", again.last_message());
    vm.kill();
}
