//! What a node runs to join: scriptlet 000 (the shape of bootstrap/dist/000-enroll.sh.example)
//! enrolls with the one-time token from fw_cfg and brings up the tunnel with what enrollment
//! wrote; and the console markers it prints, parsed.
use crate::RunResult;

/// The fw_cfg item the agent reads the token from
/// (`/sys/firmware/qemu_fw_cfg/by_name/opt/idhal/token/raw` in the guest).
pub const FW_CFG_TOKEN: &str = "opt/idhal/token";

/// `boot` frequency, like the shipped example: the first boot enrolls, later boots' `enroll`
/// says "already enrolled" without any network, and every boot starts the tunnel. Differences
/// from the example: the agent's enroll lines go to the console (the harness and the demo show
/// them), OpenVPN logs to a file and runs without kernel DCO (the test kernel has none) and, as
/// in the example, under systemd in a unit of its own; and the scriptlet waits, bounded (45 s of
/// guest uptime, whatever each poll costs under TCG), for the tunnel's address and prints it, or
/// `tunnel-failed` and OpenVPN's log.
pub const SCRIPTLET: &str = r#"#!/bin/sh
# idhal: frequency=boot
d="$IDHAL_STATE_DIR/enroll"
up() { cut -d' ' -f1 /proc/uptime; }
echo "IDHAL-TEST enroll-start uptime=$(up)" > /dev/console
idhal-bootstrap enroll --state-dir "$IDHAL_STATE_DIR" 2>/dev/console || exit $?
echo "IDHAL-TEST enrolled node=$(cat "$d/node-id") addr=$(cat "$d/address") uptime=$(up)" > /dev/console
if [ -d /run/systemd/system ]; then
  # As the shipped example: under systemd, a unit of its own (idhal-bootstrap.service would
  # kill a daemon left in it when the run ends).
  systemd-run --unit=idhal-openvpn --property=Restart=on-failure \
    openvpn --cd "$d" --config openvpn.conf --disable-dco --log /tmp/openvpn.log || exit $?
else
  openvpn --daemon --cd "$d" --config openvpn.conf --disable-dco --log /tmp/openvpn.log || exit $?
fi
end=$(( $(cut -d. -f1 /proc/uptime) + 45 ))
while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
  a=$(ip -4 addr show tun0 2>/dev/null | sed -n 's/.*inet \([0-9.]*\).*/\1/p')
  [ -n "$a" ] && { echo "IDHAL-TEST tunnel-up addr=$a uptime=$(up)" > /dev/console; exit 0; }
  sleep 0.1
done
echo "IDHAL-TEST tunnel-failed uptime=$(up)" > /dev/console
cat /tmp/openvpn.log > /dev/console
exit 1
"#;

/// A node's identity as its first run reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// `client<N>`.
    pub node: String,
    /// Its fixed VPN address (from enrollment).
    pub address: String,
    /// The address tun0 got (must be the same).
    pub tunnel: String,
}

/// Guest uptimes (seconds) of the scriptlet's steps, for the figures.
#[derive(Debug, Clone, Copy)]
pub struct Steps {
    pub enroll_start: f64,
    pub enrolled: f64,
    pub tunnel_up: f64,
}

impl Joined {
    /// From a run of [`SCRIPTLET`]: panics with the run's lines when it did not enroll or the
    /// tunnel did not come up.
    pub fn from_run(r: &RunResult) -> (Joined, Steps) {
        assert_eq!(r.exit, 0, "{}: {:?}", r.last_message(), r.lines);
        let marker = |name: &str| -> Vec<(String, String)> {
            let prefix = format!("IDHAL-TEST {name} ");
            let line = r
                .lines
                .iter()
                .find_map(|l| l.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} line: {:?}", r.lines));
            line.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let get = |kv: &[(String, String)], key: &str| {
            kv.iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("no {key}= in {kv:?}"))
        };
        let secs = |kv: &[(String, String)]| get(kv, "uptime").parse::<f64>().unwrap_or(0.0);
        let (start, enrolled, up) = (
            marker("enroll-start"),
            marker("enrolled"),
            marker("tunnel-up"),
        );
        (
            Joined {
                node: get(&enrolled, "node"),
                address: get(&enrolled, "addr"),
                tunnel: get(&up, "addr"),
            },
            Steps {
                enroll_start: secs(&start),
                enrolled: secs(&enrolled),
                tunnel_up: secs(&up),
            },
        )
    }
}
