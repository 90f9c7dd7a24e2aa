//! DNS side of the hooks against a real Knot DNS started on 127.0.0.1: RFC 2136 updates signed
//! with TSIG (A + PTR on connect, removal on disconnect), a wrong key, an unreachable server,
//! and `idhal dns zone` output served by Knot. Answers are read back with kdig.

mod hook_support;

use hook_support::*;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

struct Dns {
    knot: Knot,
    key: PathBuf,
    bad_key: PathBuf,
}

fn dns() -> Option<&'static Dns> {
    static DNS: OnceLock<Option<Dns>> = OnceLock::new();
    DNS.get_or_init(|| {
        if !Knot::available() {
            return None;
        }
        // Static zones for a second pool, rendered by the real binary, served by Knot.
        let (d, cfg, _) = setup(
            "[names]\ndomain = \"static.test\"\npool = \"10.135.9.0/24\"\n\
             [dns]\nzone_ns = \"ns.static.test\"\nzone_contact = \"hostmaster.static.test\"\n",
        );
        let out_dir = d.path().join("zones");
        let o = Command::new(IDHAL)
            .arg("--config")
            .arg(&cfg)
            .args(["dns", "zone", "--serial", "7", "--out"])
            .arg(&out_dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let read = |z: &str| std::fs::read_to_string(out_dir.join(format!("{z}.zone"))).unwrap();
        let knot = Knot::start(&[
            ("idhal.test", empty_zone("idhal.test")),
            ("134.10.in-addr.arpa", empty_zone("134.10.in-addr.arpa")),
            ("static.test", read("static.test")),
            ("9.135.10.in-addr.arpa", read("9.135.10.in-addr.arpa")),
        ]);
        let key = knot.dir.join("tsig.key");
        knot.write_key(&key, TSIG_SECRET);
        let bad_key = knot.dir.join("wrong.key");
        knot.write_key(&bad_key, "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=");
        Some(Dns { knot, key, bad_key })
    })
    .as_ref()
}

fn config(dns: &Dns, key: &std::path::Path, extra: &str) -> String {
    format!(
        "[names]\ndomain = \"idhal.test\"\n[scheduler]\nbackend = \"none\"\n\
         [dns]\nupdate = \"rfc2136\"\nserver = \"127.0.0.1:{}\"\ntsig_key_file = \"{}\"\nttl = 60\n{extra}\n",
        dns.knot.port,
        key.display()
    )
}

#[test]
fn connect_sets_a_and_ptr_disconnect_removes_them() {
    let Some(dns) = dns() else { return };
    let (_d, cfg, state) = setup(&config(dns, &dns.key, "on_disconnect = \"remove\""));
    let env = node_env("client738", "10.134.7.38", now());
    for _ in 0..2 {
        // Twice: the update replaces the RRsets, it never piles records up.
        let o = hook(&cfg, &state, "client-connect", &env);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert_eq!(dns.knot.dig("vnode-7-38.idhal.test", "A"), ["10.134.7.38"]);
    assert_eq!(
        dns.knot.dig("38.7.134.10.in-addr.arpa", "PTR"),
        ["vnode-7-38.idhal.test."]
    );
    let o = hook(&cfg, &state, "client-disconnect", &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("DNS A+PTR removed"), "{}", stderr(&o));
    assert!(dns.knot.dig("vnode-7-38.idhal.test", "A").is_empty());
    assert!(dns.knot.dig("38.7.134.10.in-addr.arpa", "PTR").is_empty());
}

#[test]
fn records_stay_on_disconnect_by_default() {
    let Some(dns) = dns() else { return };
    let (_d, cfg, state) = setup(&config(dns, &dns.key, ""));
    let env = node_env("client739", "10.134.7.39", now());
    assert!(hook(&cfg, &state, "client-connect", &env).status.success());
    assert!(hook(&cfg, &state, "client-disconnect", &env)
        .status
        .success());
    assert_eq!(dns.knot.dig("vnode-7-39.idhal.test", "A"), ["10.134.7.39"]);
}

#[test]
fn wrong_tsig_key_is_a_clear_error() {
    let Some(dns) = dns() else { return };
    let (_d, cfg, state) = setup(&config(dns, &dns.bad_key, ""));
    let o = hook(
        &cfg,
        &state,
        "client-connect",
        &node_env("client740", "10.134.7.40", now()),
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("TSIG key \"idhal-update\" rejected"), "{e}");
    assert!(!e.contains("truncated"), "{e}");
    assert!(dns.knot.dig("vnode-7-40.idhal.test", "A").is_empty());
}

#[test]
fn zone_outside_the_servers_zones_is_refused_clearly() {
    let Some(dns) = dns() else { return };
    // Knot does not serve nowhere.test: it answers NOTAUTH or REFUSED, never a silent success.
    let (_d, cfg, state) = setup(
        &format!(
            "{}forward_zone = \"nowhere.test\"\n",
            config(dns, &dns.key, "")
        )
        .replace("domain = \"idhal.test\"", "domain = \"nowhere.test\""),
    );
    let o = hook(
        &cfg,
        &state,
        "client-connect",
        &node_env("client741", "10.134.7.41", now()),
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("DNS update to"), "{}", stderr(&o));
}

#[test]
fn unreachable_dns_server_fails_within_the_timeout() {
    let Some(_) = dns() else { return };
    let port = free_port();
    let (d, cfg, state) = setup("");
    let key = d.path().join("k");
    std::fs::write(
        &key,
        format!("key \"idhal-update\" {{ algorithm hmac-sha256; secret \"{TSIG_SECRET}\"; }};\n"),
    )
    .unwrap();
    std::fs::write(
        &cfg,
        format!(
            "[scheduler]\nbackend = \"none\"\n[dns]\nupdate = \"rfc2136\"\nserver = \"127.0.0.1:{port}\"\ntsig_key_file = \"{}\"\n[limits]\ndns_timeout_ms = 1000\n",
            key.display()
        ),
    )
    .unwrap();
    let t = Instant::now();
    let o = hook(
        &cfg,
        &state,
        "client-connect",
        &node_env("client742", "10.134.7.42", now()),
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("DNS update to 127.0.0.1"),
        "{}",
        stderr(&o)
    );
    // Generous: it proves the hook gave up (an unanswered update would wait forever), not
    // its speed. The figure is printed instead.
    let took = t.elapsed();
    eprintln!(
        "unreachable DNS server: hook refused after {:.2} s (dns_timeout_ms = 1000)",
        took.as_secs_f64()
    );
    assert!(took < Duration::from_secs(60), "{took:?}");
}

#[test]
fn static_zones_from_idhal_dns_zone_resolve() {
    let Some(dns) = dns() else { return };
    assert_eq!(dns.knot.dig("vnode-9-38.static.test", "A"), ["10.135.9.38"]);
    assert_eq!(
        dns.knot.dig("38.9.135.10.in-addr.arpa", "PTR"),
        ["vnode-9-38.static.test."]
    );
    assert_eq!(
        dns.knot.dig("vnode-9-254.static.test", "A"),
        ["10.135.9.254"]
    );
    assert!(dns.knot.dig("vnode-9-255.static.test", "A").is_empty());
}

#[test]
fn broken_config_exits_2_and_names_the_file() {
    // No component needed: the hook stops before touching any backend.
    let (_d, cfg, state) = setup("[names]\ntemplate = \"node_{4}\"\n");
    let o = hook(
        &cfg,
        &state,
        "client-connect",
        &node_env("client743", "10.134.7.43", now()),
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("server.toml") && stderr(&o).contains("name template"),
        "{}",
        stderr(&o)
    );
}
