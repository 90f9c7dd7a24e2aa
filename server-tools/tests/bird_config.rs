//! `idhal bird config` against the real BIRD 2: every rendered config passes `bird -p`, each
//! inconsistent `[bird]` is refused in one line with `--out` left alone, and the rendered
//! configs run: two or three BIRDs in network namespaces this test makes carry a node /32 from
//! a server's kernel table to the head's main table, and withdraw it.

mod cli_support;

use cli_support::{idhal_run, s, Run};
use idhal_test_support::process::Logged;
use idhal_test_support::{require, wait_logged_every};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BIRD: &str = "/usr/sbin/bird";
const BIRDC: &str = "/usr/sbin/birdc";
const IP: &str = "/usr/sbin/ip";

/// A `[bird]` for a LAN 172.31.0.0/24 with head(s) `heads` and servers vpnA .11, vpnB .12.
fn bird_toml(heads: &[&str], bfd: bool) -> String {
    let heads: Vec<String> = heads.iter().map(|h| format!("{h:?}")).collect();
    format!(
        "[openvpn]\nname = \"vpnA\"\n[routing]\ntable = 100\n\
         [bird]\nasn = 65000\nlan = \"172.31.0.0/24\"\ninterface = \"lan0\"\n\
         heads = [{}]\nbfd = {bfd}\n\
         [bird.servers]\nvpnA = \"172.31.0.11\"\nvpnB = \"172.31.0.12\"\n",
        heads.join(", ")
    )
}

fn write_config(dir: &Path, toml: &str) -> PathBuf {
    let p = dir.join("server.toml");
    std::fs::write(&p, toml).unwrap();
    p
}

fn render(config: &Path, args: &[&str]) -> Run {
    let mut all = vec!["--config", s(config), "bird", "config"];
    all.extend_from_slice(args);
    idhal_run(&all)
}

/// `bird -p -c FILE` (parse only): Ok, or BIRD's own words.
fn bird_parse(dir: &Path, name: &str, text: &str) -> Result<(), String> {
    let f = dir.join(name);
    std::fs::write(&f, text).unwrap();
    let o = Command::new(BIRD)
        .arg("-p")
        .arg("-c")
        .arg(&f)
        .output()
        .unwrap();
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

#[test]
fn every_rendered_config_passes_bird_parse() {
    if !require(&[BIRD]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for heads in [&["172.31.0.1"][..], &["172.31.0.1", "172.31.0.2"]] {
        for bfd in [true, false] {
            let cfg = write_config(d.path(), &bird_toml(heads, bfd));
            let mut cases = vec![
                ("server", render(&cfg, &[]).ok().stdout),
                ("vpnB", render(&cfg, &["--name", "vpnB"]).ok().stdout),
                ("head", render(&cfg, &["--head"]).ok().stdout),
            ];
            if heads.len() == 2 {
                let second = render(&cfg, &["--head", "--router-id", "172.31.0.2"]);
                cases.push(("head2", second.ok().stdout));
            }
            for (what, text) in cases {
                let label = format!("{what}, heads {heads:?}, bfd {bfd}");
                if let Err(e) = bird_parse(d.path(), "t.conf", &text) {
                    panic!("{label}: bird -p refused it:\n{e}\n{text}");
                }
                assert_eq!(text.contains("bfd yes;"), bfd, "{label}:\n{text}");
                assert_eq!(text.contains("protocol bfd"), bfd, "{label}:\n{text}");
                assert!(text.starts_with("# BIRD 2 config for "), "{label}");
                assert!(text.contains("rendered by `idhal bird config"), "{label}");
                assert!(text.contains(&format!("{:?}", s(&cfg))), "{label}");
                if what.starts_with("head") {
                    // One session per listed server, none for the rest of the LAN.
                    assert!(!text.contains("neighbor range"), "{text}");
                    assert!(
                        text.contains("protocol bgp srv1 from vpn_server { description \"vpnA\"; neighbor 172.31.0.11 as 65000; }")
                            && text.contains("protocol bgp srv2 from vpn_server { description \"vpnB\"; neighbor 172.31.0.12 as 65000; }"),
                        "{text}"
                    );
                    assert!(text.contains("rr client;"), "{label}");
                } else {
                    let me = if what == "vpnB" { ".12" } else { ".11" };
                    assert!(
                        text.contains(&format!("router id 172.31.0{me};")),
                        "{label}"
                    );
                    for (i, h) in heads.iter().enumerate() {
                        assert!(text.contains(&format!("protocol bgp head{} {{", i + 1)));
                        assert!(text.contains(&format!("neighbor {h} as 65000;")), "{label}");
                    }
                    assert_eq!(text.matches("protocol bgp ").count(), heads.len());
                    assert!(text.contains("bgp_local_pref = krt_metric;"), "{label}");
                    assert!(text.contains("kernel table 100;"), "{label}");
                }
            }
        }
    }
    let cfg = write_config(d.path(), &bird_toml(&["172.31.0.1", "172.31.0.2"], true));
    let head2 = render(&cfg, &["--head", "--router-id", "172.31.0.2"]).ok();
    assert!(head2.stdout.contains("router id 172.31.0.2;"));
    // Without a config file there is no cluster to render.
    idhal_run(&["bird", "config"]).fails(2, "idhal: error: [routing] table is not set");
}

/// Each inconsistent `[bird]` (or argument) is one error line, exit 2, and `--out` keeps the
/// file it had.
#[test]
fn hostile_inputs_are_refused_in_one_line_and_out_is_kept() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("bird.conf");
    let base = bird_toml(&["172.31.0.1"], true);
    let no_servers = base[..base.find("[bird.servers]").unwrap()].to_owned();
    let cases: Vec<(String, Vec<&str>, &str)> = vec![
        (
            no_servers,
            vec!["--head"],
            "[bird.servers] is empty: a head peers only with the VPN servers listed there (vpnA = \"172.16.0.11\")",
        ),
        (
            base.clone(),
            vec!["--name", "vpnX"],
            "no [bird.servers] entry for vpnX (known: vpnA, vpnB): add `vpnX = \"LAN ADDRESS\"` under [bird.servers]",
        ),
        (
            base.replace("vpnB = \"172.31.0.12\"", "vpnB = \"172.31.1.12\""),
            vec![],
            "[bird.servers] vpnB = 172.31.1.12 is not a host address of [bird] lan 172.31.0.0/24",
        ),
        (
            base.replace("vpnB = \"172.31.0.12\"", "vpnB = \"172.31.0.255\""),
            vec![],
            "[bird.servers] vpnB = 172.31.0.255 is not a host address of [bird] lan 172.31.0.0/24",
        ),
        (
            base.replace("heads = [\"172.31.0.1\"]", "heads = [\"10.0.0.1\"]"),
            vec!["--head"],
            "[bird] heads: 10.0.0.1 is not a host address of [bird] lan 172.31.0.0/24",
        ),
        (
            base.replace("heads = [\"172.31.0.1\"]", "heads = []"),
            vec![],
            "[bird] heads is empty: every VPN server peers with at least one head (route reflector); e.g. heads = [\"172.16.0.1\"]",
        ),
        (
            base.replace("vpnB = \"172.31.0.12\"", "vpnB = \"172.31.0.11\""),
            vec!["--head"],
            "[bird.servers] vpnA and vpnB both have address 172.31.0.11: each server's address is its BGP router id and must be its own",
        ),
        (
            base.replace("vpnB = \"172.31.0.12\"", "vpnB = \"172.31.0.1\""),
            vec![],
            "[bird.servers] vpnB = 172.31.0.1 is also in [bird] heads: a VPN server and a head need their own addresses (router ids)",
        ),
        (
            base.clone(),
            vec!["--head", "--router-id", "172.31.0.9"],
            "--router-id 172.31.0.9 is not in [bird] heads: the VPN servers peer only with the heads listed there",
        ),
        (
            base.replace("lan = \"172.31.0.0/24\"\n", ""),
            vec![],
            "[bird] lan is not set: it is the cluster LAN the VPN servers and the head share (e.g. lan = \"172.16.0.0/24\")",
        ),
        (
            base.replace("172.31.0.", "10.134.9.")
                .replace("172.31.0.0/24", "10.134.9.0/24"),
            vec![],
            "[bird] lan 10.134.9.0/24 overlaps [names] pool 10.134.0.0/16: a node address could be a LAN address",
        ),
    ];
    for (toml, args, line) in cases {
        let cfg = write_config(d.path(), &toml);
        std::fs::write(&out, "old\n").unwrap();
        let mut all = args.clone();
        all.extend(["--out", s(&out)]);
        let r = render(&cfg, &all).fails(2, line);
        assert_eq!(r.stderr, format!("idhal: error: {line}\n"), "{args:?}");
        assert_eq!(r.stdout, "");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "old\n", "{line}");
    }
    // Values BIRD or the kernel would not take are refused while the config is read (exit 2,
    // TOML's pointer at the line), also before anything is written.
    let toml_cases = [
        ("asn = 65000", "asn = 0", "[bird] asn 0 is not usable"),
        ("asn = 65000", "asn = 4294967295", "[bird] asn 4294967295 is not usable"),
        ("asn = 65000", "asn = 4294967296", "invalid value"),
        ("asn = 65000", "asn = -1", "invalid value"),
        (
            "interface = \"lan0\"",
            "interface = \"lan0\\\"; protocol static {\"",
            "interface name \"lan0\\\"; protocol static {\" is not valid",
        ),
        (
            "interface = \"lan0\"",
            "interface = \"a234567890123456\"",
            "interface name \"a234567890123456\" is not valid: 1-15 of A-Z a-z 0-9 _ . - (not . or ..)",
        ),
        ("interface = \"lan0\"", "interface = \"\"", "interface name \"\" is not valid"),
        ("table = 100", "table = 254", "[routing] table = 254 (the kernel's main table) is refused"),
        ("table = 100", "table = 0", "[routing] table = 0 (unspecified) is refused"),
        (
            "lan = \"172.31.0.0/24\"",
            "lan = \"172.31.0.1/24\"",
            "[bird] lan \"172.31.0.1/24\" is not valid: an IPv4 network like 172.16.0.0/24",
        ),
        ("heads = [\"172.31.0.1\"]", "heads = [\"172.31.0.1; x\"]", "invalid IPv4 address syntax"),
        (
            "vpnB = \"172.31.0.12\"",
            "\"vpn B\" = \"172.31.0.12\"",
            "server name \"vpn B\" is not valid",
        ),
        ("vpnB = \"172.31.0.12\"", "vpnB = \"172.31.0.12/32\"", "invalid IPv4 address syntax"),
        ("bfd = true", "bfd = \"yes\"", "invalid type"),
        ("bfd = true", "bfd = true\nmultihop = true", "unknown field `multihop`"),
    ];
    for (from, to, needle) in toml_cases {
        assert!(base.contains(from), "{from}");
        let cfg = write_config(d.path(), &base.replace(from, to));
        std::fs::write(&out, "old\n").unwrap();
        let r = render(&cfg, &["--out", s(&out)]).fails(2, needle);
        assert_eq!(r.stdout, "");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "old\n", "{to}");
    }
    // A --name that is not a server name at all is clap's usage error (2), before any config.
    let cfg = write_config(d.path(), &base);
    render(&cfg, &["--name", "../x", "--out", s(&out)])
        .fails(2, "server name \"../x\" is not valid");
    render(&cfg, &["--name", "vpnA", "--head"]).fails(2, "cannot be used with");
    render(&cfg, &["--router-id", "172.31.0.1"]).fails(2, "--head");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "old\n");
}

#[test]
fn out_replaces_the_file_atomically_and_a_failed_write_keeps_it() {
    use std::os::unix::fs::PermissionsExt as _;
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(d.path(), &bird_toml(&["172.31.0.1"], true));
    let out = d.path().join("etc").join("bird.conf");
    // No such directory: a write error (exit 1), nothing made.
    render(&cfg, &["--out", s(&out)]).fails(1, "writing ");
    assert!(!out.parent().unwrap().exists());
    std::fs::create_dir(out.parent().unwrap()).unwrap();
    std::fs::write(&out, "old\n").unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = render(&cfg, &["--out", s(&out)]).ok();
    assert_eq!(r.stdout, "");
    assert!(r.stderr.contains("wrote "), "{}", r.stderr);
    let printed = render(&cfg, &[]).ok().stdout;
    assert_eq!(std::fs::read_to_string(&out).unwrap(), printed);
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o644,
        "a new file (rename), readable by BIRD's own user"
    );
    let names: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("bird.conf")],
        "no temp file left"
    );
}

// ---------------------------------------------------------------------------------------------
// Live: the rendered configs in network namespaces.

/// Network namespaces `idhal-t-PID-…` joined by veth pairs: the head's `lan0` is a bridge
/// holding one veth end per server, each server's other end is its `lan0`, and a veth pair
/// `tun0`/`tun0p` in each server stands in for OpenVPN's tun. Its BIRDs are stopped and its
/// namespaces deleted on drop, also when the test panics.
struct Lab {
    dir: tempfile::TempDir,
    head: String,
    servers: Vec<String>,
    birds: Vec<Logged>,
}

fn ip(args: &[&str]) -> String {
    let o = Command::new(IP).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

impl Lab {
    /// A head at 172.31.0.1 and `n` servers at 172.31.0.11, .12 …
    fn new(tag: &str, n: usize) -> Lab {
        let base = format!("idhal-t-{}-{tag}", std::process::id());
        let mut lab = Lab {
            dir: tempfile::tempdir().unwrap(),
            head: format!("{base}-h"),
            servers: Vec::new(),
            birds: Vec::new(),
        };
        // Registered before each is made, so a failure half-way still removes it.
        ip(&["netns", "add", &lab.head]);
        let h = lab.head.clone();
        ip(&["-n", &h, "link", "set", "lo", "up"]);
        ip(&["-n", &h, "link", "add", "lan0", "type", "bridge"]);
        ip(&["-n", &h, "addr", "add", "172.31.0.1/24", "dev", "lan0"]);
        ip(&["-n", &h, "link", "set", "lan0", "up"]);
        for i in 0..n {
            let ns = format!("{base}-s{i}");
            lab.servers.push(ns.clone());
            ip(&["netns", "add", &ns]);
            let port = format!("p{i}");
            ip(&[
                "link", "add", "lan0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &h,
            ]);
            ip(&["-n", &h, "link", "set", &port, "master", "lan0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            let addr = format!("172.31.0.{}/24", 11 + i);
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "lan0"]);
            ip(&["-n", &ns, "link", "set", "lan0", "up"]);
            ip(&[
                "-n", &ns, "link", "add", "tun0", "type", "veth", "peer", "name", "tun0p",
            ]);
            ip(&["-n", &ns, "link", "set", "tun0", "up"]);
            ip(&["-n", &ns, "link", "set", "tun0p", "up"]);
        }
        lab
    }

    fn sock(&self, ns: &str) -> PathBuf {
        self.dir.path().join(format!("{ns}.ctl"))
    }

    /// Runs BIRD in `ns` with `config` (foreground, its own log).
    fn bird(&mut self, ns: &str, config: &str) {
        let conf = self.dir.path().join(format!("{ns}.conf"));
        // BIRD's own words into its log (the rendered config leaves logging to the host's
        // syslog), printed when a test fails.
        let config = format!("log stderr all;\ndebug protocols {{ states, events }};\n{config}");
        std::fs::write(&conf, config).unwrap();
        let mut cmd = Command::new(IP);
        cmd.args(["netns", "exec", ns, BIRD, "-f", "-c"])
            .arg(&conf)
            .arg("-s")
            .arg(self.sock(ns))
            .arg("-P")
            .arg(self.dir.path().join(format!("{ns}.pid")));
        let log = self.dir.path().join(format!("{ns}.log"));
        self.birds.push(Logged::spawn(&mut cmd, log));
    }

    fn birdc(&self, ns: &str, args: &[&str]) -> String {
        let o = Command::new(BIRDC)
            .arg("-s")
            .arg(self.sock(ns))
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn logs(&self) -> Vec<PathBuf> {
        self.birds.iter().map(|b| b.log.clone()).collect()
    }

    /// Waits until server `ns`'s BGP session `head1` is Established.
    fn established(&self, ns: &str) {
        let logs = self.logs();
        let logs: Vec<&Path> = logs.iter().map(PathBuf::as_path).collect();
        wait_logged_every(
            &format!("{ns}: BGP head1 Established"),
            Duration::from_secs(60),
            Duration::from_millis(100),
            &logs,
            || {
                let p = self.birdc(ns, &["show", "protocols", "head1"]);
                p.contains("Established").then_some(())
            },
        );
    }

    /// Waits until `ns`'s BFD session with `peer` is Up.
    fn bfd_up(&self, ns: &str, peer: &str) {
        wait_logged_every(
            &format!("{ns}: BFD session with {peer} Up"),
            Duration::from_secs(30),
            Duration::from_millis(20),
            &[],
            || {
                let out = self.birdc(ns, &["show", "bfd", "sessions"]);
                out.lines()
                    .any(|l| l.starts_with(&format!("{peer} ")) && l.contains(" Up "))
                    .then_some(())
            },
        );
    }

    /// The head's main-table route to `prefix` (one line per next hop), as `ip` shows it.
    fn head_route(&self, prefix: &str) -> String {
        ip(&["-n", &self.head, "route", "show", prefix])
    }

    /// Waits until the head's route to `prefix` satisfies `want`; returns how long after
    /// `start` that was.
    fn head_until_from(
        &self,
        start: Instant,
        prefix: &str,
        what: &str,
        want: impl Fn(&str) -> bool,
    ) -> Duration {
        let logs = self.logs();
        let logs: Vec<&Path> = logs.iter().map(PathBuf::as_path).collect();
        wait_logged_every(
            &format!("head's route to {prefix}: {what}"),
            Duration::from_secs(30),
            Duration::from_millis(5),
            &logs,
            || want(&self.head_route(prefix)).then_some(()),
        );
        start.elapsed()
    }

    fn head_until(&self, prefix: &str, what: &str, want: impl Fn(&str) -> bool) -> Duration {
        self.head_until_from(Instant::now(), prefix, what, want)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for ns in self.servers.iter().chain([&self.head]) {
                eprintln!(
                    "---- {ns}: birdc show protocols all\n{}",
                    self.birdc(ns, &["show", "protocols", "all"])
                );
            }
        }
        // BIRDs first (each is stopped and waited for), then their namespaces.
        self.birds.clear();
        for ns in self.servers.iter().chain([&self.head]) {
            let _ = Command::new(IP).args(["netns", "del", ns]).status();
        }
    }
}

fn live_available() -> bool {
    require(&[BIRD, BIRDC, IP])
}

/// The rendered configs of `lab`'s servers (vpnA, vpnB, … by index) and head.
fn start_birds(lab: &mut Lab, n: usize, bfd: bool) {
    let d = lab.dir.path().to_owned();
    let names = ["vpnA", "vpnB", "vpnC"];
    let mut toml = format!(
        "[routing]\ntable = 100\n[bird]\nlan = \"172.31.0.0/24\"\nheads = [\"172.31.0.1\"]\nbfd = {bfd}\n[bird.servers]\n"
    );
    for (i, name) in names.iter().take(n).enumerate() {
        toml.push_str(&format!("{name} = \"172.31.0.{}\"\n", 11 + i));
    }
    let cfg = write_config(&d, &toml);
    let head = render(&cfg, &["--head"]).ok().stdout;
    let h = lab.head.clone();
    lab.bird(&h, &head);
    for (i, name) in names.iter().take(n).enumerate() {
        let text = render(&cfg, &["--name", name]).ok().stdout;
        let ns = lab.servers[i].clone();
        lab.bird(&ns, &text);
    }
    for ns in lab.servers.clone() {
        lab.established(&ns);
    }
}

const NODE: &str = "10.134.7.38";

fn node_route(ns: &str, op: &str, metric: u32) {
    route_of(ns, op, NODE, metric)
}

fn route_of(ns: &str, op: &str, node: &str, metric: u32) {
    let m = metric.to_string();
    let prefix = format!("{node}/32");
    let mut args = vec!["-n", ns, "route", op, &prefix];
    if op == "add" {
        args.extend([
            "dev", "tun0", "table", "100", "proto", "static", "metric", &m,
        ]);
    } else {
        args.extend(["table", "100", "metric", &m]);
    }
    ip(&args);
}

/// A /32 idhal would write into a server's table 100 reaches the head's main table via the
/// server's LAN address, and goes when it is deleted. Prints the convergence.
#[test]
fn a_node_route_reaches_the_head_and_goes() {
    if !live_available() {
        return;
    }
    let mut lab = Lab::new("one", 1);
    start_birds(&mut lab, 1, true);
    let a = lab.servers[0].clone();
    // Something outside the pool in table 100 stays on the server (the export filter).
    ip(&[
        "-n",
        &a,
        "route",
        "add",
        "192.0.2.7/32",
        "dev",
        "tun0",
        "table",
        "100",
        "proto",
        "static",
    ]);
    let mut added = Vec::new();
    let mut gone = Vec::new();
    for round in 0..5u32 {
        // Timed from before `ip route add`, as idhal's route writer would run it.
        let t = Instant::now();
        node_route(&a, "add", 1_800_000_000 + round);
        added.push(lab.head_until_from(t, NODE, "via server A", |r| {
            r.contains("via 172.31.0.11 dev lan0 proto bird")
        }));
        if round == 0 {
            // What A sends its head: the node, not the route outside the pool.
            let sent = lab.birdc(&a, &["show", "route", "export", "head1"]);
            assert!(sent.contains("10.134.7.38/32"), "{sent}");
            assert!(!sent.contains("192.0.2.7"), "{sent}");
        }
        let t = Instant::now();
        node_route(&a, "del", 1_800_000_000 + round);
        gone.push(lab.head_until_from(t, NODE, "gone", |r| r.trim().is_empty()));
    }
    assert_eq!(
        lab.head_route("192.0.2.7"),
        "",
        "outside [names] pool: not announced"
    );
    let ms = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "bird convergence (server table 100 -> head main table, 5 rounds, ms): added {}; deleted {}",
        ms(&added),
        ms(&gone)
    );
}

/// Two servers announce one /32 (a node moved and the old server has not noticed): the head
/// routes it to the one whose route has the bigger metric (the newer session), not to both.
#[test]
fn the_bigger_metric_wins_at_the_head() {
    if !live_available() {
        return;
    }
    let mut lab = Lab::new("two", 2);
    start_birds(&mut lab, 2, true);
    let (a, b) = (lab.servers[0].clone(), lab.servers[1].clone());
    let only = |via: &'static str, not: &'static str| {
        move |r: &str| r.contains(via) && !r.contains(not) && !r.contains("nexthop")
    };
    node_route(&a, "add", 1_800_000_100);
    lab.head_until(NODE, "via A", only("via 172.31.0.11", "172.31.0.12"));
    let t = Instant::now();
    node_route(&b, "add", 1_800_000_200);
    let t = lab.head_until_from(
        t,
        NODE,
        "via B only",
        only("via 172.31.0.12", "172.31.0.11"),
    );
    println!(
        "bird: newer session on B took over at the head after {:.0} ms",
        t.as_secs_f64() * 1000.0
    );
    // The newer one leaving hands it back to the older one.
    node_route(&b, "del", 1_800_000_200);
    lab.head_until(NODE, "back via A", only("via 172.31.0.11", "172.31.0.12"));
    // A newer session on A again beats B's.
    node_route(&b, "add", 1_800_000_300);
    lab.head_until(NODE, "via B", only("via 172.31.0.12", "172.31.0.11"));
    node_route(&a, "del", 1_800_000_100);
    node_route(&a, "add", 1_800_000_400);
    lab.head_until(NODE, "via A again", only("via 172.31.0.11", "172.31.0.12"));
    // B now hears A's newer route, but keeps the node on its own tun (its kernel route's
    // preference 200 beats BGP's 100) while it has it: nothing via A in B's main table.
    wait_logged_every(
        "B's BIRD: A's route to the node",
        Duration::from_secs(30),
        Duration::from_millis(20),
        &[],
        || {
            lab.birdc(&b, &["show", "route", "for", NODE, "all"])
                .contains("via 172.31.0.11")
                .then_some(())
        },
    );
    let b_main = ip(&["-n", &b, "route", "show", NODE]);
    assert_eq!(b_main, "", "B routes its own node to its tun, not to A");
    // Once B's own route goes, B learns A's node over BGP into its main table.
    node_route(&b, "del", 1_800_000_300);
    wait_logged_every(
        "B's main table: the node via A",
        Duration::from_secs(30),
        Duration::from_millis(20),
        &[],
        || {
            ip(&["-n", &b, "route", "show", NODE])
                .contains("via 172.31.0.11 dev lan0 proto bird")
                .then_some(())
        },
    );
}

/// A server that dies takes its nodes' routes off the head: its BIRD killed (the kernel closes
/// its BGP session at once), or its host cut off the LAN (BFD notices, or else the 3 s hold
/// time). Prints how long each took.
#[test]
fn a_dead_servers_routes_leave_the_head() {
    if !live_available() {
        return;
    }
    let mut figures = Vec::new();
    for bfd in [true, false] {
        let mut lab = Lab::new(if bfd { "bfd" } else { "hold" }, 2);
        start_birds(&mut lab, 2, bfd);
        let (a, b) = (lab.servers[0].clone(), lab.servers[1].clone());
        const OTHER: &str = "10.134.7.39";
        route_of(&a, "add", NODE, 1_800_000_000);
        route_of(&b, "add", OTHER, 1_800_000_000);
        lab.head_until(NODE, "via A", |r| r.contains("via 172.31.0.11"));
        lab.head_until(OTHER, "via B", |r| r.contains("via 172.31.0.12"));
        if bfd {
            // A's BIRD SIGKILLed (lab.birds: the head's, then the servers' in order).
            let t = Instant::now();
            lab.birds[1].child.kill().unwrap();
            let gone = lab.head_until_from(t, NODE, "gone after A's BIRD died", |r| r.is_empty());
            figures.push(format!(
                "BIRD killed: {:.0} ms",
                gone.as_secs_f64() * 1000.0
            ));
        }
        if bfd {
            // Measured from a BFD session up on both ends: cut before it is, the session is
            // only protected by the hold time (seen here: 4-5 s).
            let h = lab.head.clone();
            lab.bfd_up(&h, "172.31.0.12");
            lab.bfd_up(&b, "172.31.0.1");
        }
        // B cut off: its LAN link down on its side only (the head's bridge stays up through
        // A's port, so only BGP, BFD or the hold time can tell the head).
        let t = Instant::now();
        ip(&["-n", &b, "link", "set", "lan0", "down"]);
        let gone = lab.head_until_from(t, OTHER, "gone after B was cut off", |r| r.is_empty());
        figures.push(format!(
            "host cut off, bfd {bfd}: {:.0} ms",
            gone.as_secs_f64() * 1000.0
        ));
    }
    println!(
        "bird: a dead server's routes gone at the head: {}",
        figures.join("; ")
    );
}

/// Not a check of its own: the child of the test below, which makes a lab and panics.
#[test]
fn child_lab_that_panics() {
    if std::env::var_os("IDHAL_BIRD_TEST_CHILD").is_some() && live_available() {
        let lab = Lab::new("panic", 1);
        assert!(ip(&["netns", "list"]).contains(&lab.head));
        panic!("the child's deliberate panic in {}", lab.head);
    }
}

/// A test that fails half-way leaves no namespace behind.
#[test]
fn a_panicking_test_removes_its_namespaces() {
    if !live_available() {
        return;
    }
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_lab_that_panics", "--nocapture"])
        .env("IDHAL_BIRD_TEST_CHILD", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&child.stderr);
    assert!(text.contains("the child's deliberate panic"), "{text}");
    assert_eq!(child.status.code(), Some(101), "{text}");
    // The child's namespaces are named after its pid, which its panic message carries.
    let pid = text
        .split("idhal-t-")
        .nth(1)
        .and_then(|t| t.split('-').next())
        .unwrap_or_else(|| panic!("the child names its lab: {text}"));
    let left = ip(&["netns", "list"]);
    assert!(
        !left.contains(&format!("idhal-t-{pid}-")),
        "left behind:\n{left}"
    );
}

/// Big and odd inputs: a [bird.servers] of 4,000 servers, a config path that tries to end the
/// header comment, and renders racing to one --out file.
#[test]
fn big_odd_and_concurrent_inputs() {
    if !require(&[BIRD]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let mut toml =
        "[routing]\ntable = 100\n[bird]\nlan = \"172.20.0.0/16\"\nheads = [\"172.20.0.1\"]\n[bird.servers]\n".to_owned();
    for i in 0..4000u32 {
        toml.push_str(&format!(
            "vpn{i} = \"172.20.{}.{}\"\n",
            1 + i / 250,
            1 + i % 250
        ));
    }
    let cfg = write_config(d.path(), &toml);
    let t = Instant::now();
    let r = render(&cfg, &["--name", "vpn3999"]).ok();
    println!(
        "bird: rendering a server's config from 4,000 servers took {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
    assert!(
        r.stdout.contains("router id 172.20.16.250;"),
        "{}",
        r.stdout
    );
    bird_parse(d.path(), "big.conf", &r.stdout).unwrap();
    // A config whose path holds a newline and BIRD syntax: quoted, it stays in the comment.
    let odd_dir = d.path().join("x\nrouter id 9.9.9.9;\nprotocol static {");
    std::fs::create_dir(&odd_dir).unwrap();
    let odd = write_config(&odd_dir, &bird_toml(&["172.31.0.1"], true));
    let text = render(&odd, &[]).ok().stdout;
    assert!(!text.contains("\nrouter id 9.9.9.9;"), "{text}");
    bird_parse(d.path(), "odd.conf", &text).unwrap();
    // Eight renders of two different servers to one file at once: it ends whole, one of the two.
    let cfg = write_config(d.path(), &bird_toml(&["172.31.0.1"], true));
    let out = d.path().join("etc");
    std::fs::create_dir(&out).unwrap();
    let out = out.join("bird.conf");
    let a = render(&cfg, &["--name", "vpnA"]).ok().stdout;
    let b = render(&cfg, &["--name", "vpnB"]).ok().stdout;
    let runs: Vec<_> = (0..8)
        .map(|i| {
            let name = if i % 2 == 0 { "vpnA" } else { "vpnB" };
            cli_support::idhal()
                .args(["--config", s(&cfg), "bird", "config", "--name", name])
                .args(["--out", s(&out)])
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in runs {
        assert!(c.wait().unwrap().success());
    }
    let got = std::fs::read_to_string(&out).unwrap();
    assert!(got == a || got == b, "a torn file:\n{got}");
    assert_eq!(std::fs::read_dir(out.parent().unwrap()).unwrap().count(), 1);
}
