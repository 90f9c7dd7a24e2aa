//! The batch cluster the nodes join: a real OAR 2.5 on PostgreSQL and a real Knot DNS serving
//! the node zones, both on 127.0.0.1 with ephemeral ports. They are idhal-test-support's
//! fixtures (the hook tests' too: one definition), started once per process and shared by its
//! tests: each test uses its own address pool, so host names never collide.
use idhal_test_support::knot::{empty_zone, Knot, TSIG_SECRET};
use idhal_test_support::oar::Oar;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// The DNS domain of the test nodes; their reverse zone is 134.10.in-addr.arpa (pools inside
/// 10.134.0.0/16).
pub const DOMAIN: &str = "idhal.test";
pub const REVERSE_ZONE: &str = "134.10.in-addr.arpa";

pub struct Cluster {
    pub oar: Oar,
    pub knot: Knot,
    /// The TSIG key file `idhal hook` signs its DNS updates with.
    pub tsig: PathBuf,
}

impl Cluster {
    /// The programs the cluster needs, checked with the one rule: missing ones skip (with a
    /// loud message) in a plain `cargo test` and fail under scripts/test.sh and CI.
    pub fn available() -> bool {
        Oar::available() && Knot::available()
    }

    /// Starts OAR (PostgreSQL + Almighty) and Knot; they are stopped (and their files removed)
    /// when this process exits, however it exits (the fixtures' reaper).
    pub fn start() -> Cluster {
        let oar = Oar::start();
        let knot = Knot::start(&[
            (DOMAIN, empty_zone(DOMAIN)),
            (REVERSE_ZONE, empty_zone(REVERSE_ZONE)),
        ]);
        let tsig = knot.dir.join("tsig.key");
        knot.write_key(&tsig, TSIG_SECRET);
        Cluster { oar, knot, tsig }
    }

    /// One cluster per process, started by the first test that asks; `None`: skip.
    pub fn shared() -> Option<&'static Cluster> {
        static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();
        CLUSTER
            .get_or_init(|| Cluster::available().then(Cluster::start))
            .as_ref()
    }

    /// The server config sections that point `idhal hook` at this OAR and this Knot.
    pub fn server_toml(&self) -> String {
        format!(
            "[names]\ndomain = \"{DOMAIN}\"\n\
             [dns]\nupdate = \"rfc2136\"\nserver = \"127.0.0.1:{}\"\ntsig_key_file = \"{}\"\n{}",
            self.knot.port,
            self.tsig.display(),
            self.oar.config_section()
        )
    }

    /// The node's host name, from its address with the default `[names] template`
    /// (`vnode-{3}-{4}`).
    pub fn host(address: &str) -> String {
        let o: Vec<&str> = address.split('.').collect();
        assert_eq!(o.len(), 4, "not an IPv4 address: {address:?}");
        format!("vnode-{}-{}.{DOMAIN}", o[2], o[3])
    }

    /// The PTR name of an address.
    pub fn ptr_name(address: &str) -> String {
        let o: Vec<&str> = address.split('.').collect();
        format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
    }

    /// OAR's resources of `host`.
    pub fn resources(&self, host: &str) -> Vec<serde_json::Value> {
        self.oar.host(host)
    }

    /// Waits (bounded) until `host` has a resource in `state` and returns it.
    pub fn wait_state(&self, host: &str, state: &str, limit: Duration) -> serde_json::Value {
        crate::wait_until(&format!("{host} {state} in OAR"), limit, || {
            self.resources(host)
                .into_iter()
                .find(|r| r["state"] == state)
        })
    }

    /// Waits (bounded) for `name`'s `rtype` records in Knot to be non-empty.
    pub fn wait_dns(&self, name: &str, rtype: &str, limit: Duration) -> Vec<String> {
        crate::wait_until(&format!("{rtype} {name} in Knot"), limit, || {
            let a = self.knot.dig(name, rtype);
            (!a.is_empty()).then_some(a)
        })
    }

    /// Stops Almighty, PostgreSQL and Knot now, waited for (the demo; the tests leave that to
    /// the reaper at exit).
    pub fn stop(&self) {
        self.oar.stop_almighty();
        self.oar.stop_postgres();
        self.knot.stop();
    }
}
