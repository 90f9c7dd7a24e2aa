#!/usr/bin/env bash
# The README's main command: one vnode, from nothing to Alive in a batch cluster, on this machine.
# Installs what is missing (scripts/setup-debian.sh), builds the server tools, the static agent and
# the demo driver, then runs `idhal-demo` (qemu-tests/src/bin/idhal-demo.rs), which starts every
# server on 127.0.0.1 with ephemeral ports (OAR 2.5 on PostgreSQL, Knot, idhal serve with the
# project CA, OpenVPN), boots the vnode under QEMU and follows it step by step: key pinned,
# manifest verified, enrolled, tunnel up, Alive in OAR, DNS records, a tampered manifest refused,
# power-off to Absent. Everything it starts is stopped; its files live in one temp dir, removed
# at the end. Needs root (or sudo): OpenVPN opens a tun device, PostgreSQL and OAR run as their users.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "setup (installs what is missing)"
scripts/setup-debian.sh

step "build: idhal, the static agent, the demo driver (release)"
cargo build -q --locked --release -p idhal-server-tools --bin idhal
cargo build -q --locked --release --target x86_64-unknown-linux-musl -p idhal-bootstrap
cargo build -q --locked --release -p idhal-qemu-tests --bin idhal-demo
target=${CARGO_TARGET_DIR:-$PWD/target}

# Every temp dir of the demo (the node's, OAR's, Knot's) goes under this one. PostgreSQL runs as
# the postgres user and must be able to reach its data dir below it.
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
work=$(mktemp -d /tmp/idhal-demo.XXXXXX)
chmod 755 "$work"
trap '$sudo rm -rf "$work"' EXIT

$sudo env TMPDIR="$work" \
    IDHAL_BIN="$target/release/idhal" \
    IDHAL_AGENT_BIN="$target/x86_64-unknown-linux-musl/release/idhal-bootstrap" \
    "$target/release/idhal-demo" "$@"

step "done: everything the demo started is stopped, its files removed"
