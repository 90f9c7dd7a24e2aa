#!/usr/bin/env bash
# The boot-storm benchmark (docs/benchmarks.md, "Boot storm"): builds idhal and idhal-storm in
# release and runs the storm with the options given, e.g.
#   sudo env "PATH=$PATH" bash scripts/storm.sh --nodes 1000 --openvpn-clients 200
# Everything runs on 127.0.0.1 and is stopped by pid at exit (Ctrl-C included). Needs root and
# the packages of scripts/apt-packages.txt. `--help` lists every option. Not part of
# scripts/test.sh: it prints figures and asserts no time.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "storm.sh: run as root (PostgreSQL, OAR and OpenVPN run as their own users; OpenVPN needs a tun device): sudo env \"PATH=\$PATH\" bash scripts/storm.sh $*" >&2
    exit 2
fi
cargo build --release --locked -p idhal-server-tools --bin idhal -p idhal-storm --bin idhal-storm
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$PWD/$target" ;; esac
exec "$target/release/idhal-storm" --idhal "$target/release/idhal" "$@"
