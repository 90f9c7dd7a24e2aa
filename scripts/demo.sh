#!/usr/bin/env bash
# The README's main command: one vnode, from nothing to Alive in a batch cluster, on this machine.
# Installs what is missing (scripts/setup-debian.sh), builds the server tools, the static agent and
# the demo driver, then runs `idhal-demo` (qemu-tests/src/bin/idhal-demo.rs), which starts every
# server on 127.0.0.1 with ephemeral ports (OAR 2.5 on PostgreSQL, Knot, idhal serve with the
# project CA, OpenVPN), boots the vnode under QEMU and follows it step by step: key pinned,
# manifest verified, enrolled, tunnel up, Alive in OAR, DNS records, a tampered manifest refused,
# power-off to Absent. Needs root (or sudo): OpenVPN opens a tun device, PostgreSQL and OAR run
# as their users.
#
# Cleanup does not depend on the demo ending well. Everything it starts runs in one session of
# its own (setsid); when this script exits, however the demo ended (an error, a panic, an abort,
# Ctrl-C, kill -9), every process of that session, and any process working inside the demo's
# directory, gets SIGTERM, then SIGKILL 10 s later, and only when none is left is the directory
# removed. `IDHAL_DEMO_FAIL_AT=N` (or `N:abort`) makes the demo fail at step N on purpose: the
# cleanup test (qemu-tests/tests/vm_demo_cleanup.rs) does that and looks for leftovers.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "setup (installs what is missing)"
scripts/setup-debian.sh

step "build: idhal, the static agent (release), the demo driver"
target=${CARGO_TARGET_DIR:-$PWD/target}
# IDHAL_BIN, IDHAL_AGENT_BIN, IDHAL_DEMO_BIN: prebuilt ones instead (the cleanup test's, built
# by the cargo that runs it).
if [ -z "${IDHAL_BIN:-}" ]; then
    cargo build -q --locked --release -p idhal-server-tools --bin idhal
    IDHAL_BIN=$target/release/idhal
fi
if [ -z "${IDHAL_AGENT_BIN:-}" ]; then
    cargo build -q --locked --release --target x86_64-unknown-linux-musl -p idhal-bootstrap
    IDHAL_AGENT_BIN=$target/x86_64-unknown-linux-musl/release/idhal-bootstrap
fi
if [ -z "${IDHAL_DEMO_BIN:-}" ]; then
    # The dev profile: the release profile aborts on panic (the agent's size), which would skip
    # the driver's own cleanup (killing the VM, printing its console) when a step fails.
    cargo build -q --locked -p idhal-qemu-tests --bin idhal-demo
    IDHAL_DEMO_BIN=$target/debug/idhal-demo
fi

sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
# Every temp dir of the demo (the node's, OAR's, Knot's) goes under this one. PostgreSQL runs as
# the postgres user and must be able to reach its data dir below it.
work=$(mktemp -d "${TMPDIR:-/tmp}/idhal-demo.XXXXXX")
chmod 755 "$work"

# Run as root with the demo's directory in IDHAL_DEMO_RUN (not an argument: no command line of
# this cleanup may name it, or it would find itself), where the session id is: stops every
# process of that session, or working inside that directory (PostgreSQL's children start
# sessions of their own), or naming it on its command line (QEMU's guestfwd socat too), zombies
# aside; TERM, then KILL. /proc/PID/stat: after the command name's ")" come state, ppid, pgrp,
# session. One `find` and one `grep` for all processes: a command per process is slow on a busy
# machine.
stop_run='
dir=$IDHAL_DEMO_RUN
sid=$(cat "$dir/session" 2>/dev/null || true)
case $sid in ""|*[!0-9]*) sid=none ;; esac
members() {
    for st in /proc/[0-9]*/stat; do
        read -r line 2>/dev/null < "$st" || continue
        set -- ${line##*) }
        [ "$1" != Z ] && [ "$4" = "$sid" ] && { pid=${st#/proc/}; echo "${pid%/stat}"; }
    done
    { find /proc/[0-9]*/cwd -maxdepth 0 \( -lname "$dir" -o -lname "$dir/*" \) 2>/dev/null
      grep -lsF -f <(printf "%s/\n" "$dir") /proc/[0-9]*/cmdline; } |
        while read -r c; do
            pid=${c#/proc/}; pid=${pid%/*}
            read -r line 2>/dev/null < "/proc/$pid/stat" || continue
            set -- ${line##*) }
            [ "$1" != Z ] && echo "$pid"
        done
}
stop() {
    sig=$1 deadline=$((SECONDS + $2))
    pids=$(members)
    [ -z "$pids" ] && return 0
    kill -"$sig" $pids 2>/dev/null || true
    while [ $SECONDS -lt $deadline ]; do
        [ -z "$(members)" ] && return 0
        sleep 0.2
    done
    [ -z "$(members)" ]
}
stop TERM 10 || stop KILL 5 || { echo "demo.sh: still running after SIGKILL: $(members | tr "\n" " ")" >&2; exit 1; }
'

cleanup() {
    rc=$?
    trap - EXIT INT TERM
    if ! $sudo env IDHAL_DEMO_RUN="$work" bash -c "$stop_run"; then
        echo "demo.sh: left $work in place (processes still use it)" >&2
        exit 1
    fi
    $sudo rm -rf "$work"
    if [ "$rc" = 0 ]; then
        step "done: everything the demo started is stopped, its files removed"
    else
        echo "demo.sh: the demo failed (exit $rc); everything it started is stopped, its files removed" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# In the background and waited for, so Ctrl-C reaches the trap at once (a foreground command
# would delay it until the demo ended). The session's first process writes its id (= its pid).
$sudo setsid -w bash -c 'echo $$ > "$1"; shift; exec "$@"' demo-session "$work/session" \
    env TMPDIR="$work" IDHAL_BIN="$IDHAL_BIN" IDHAL_AGENT_BIN="$IDHAL_AGENT_BIN" \
    ${IDHAL_DEMO_FAIL_AT:+IDHAL_DEMO_FAIL_AT="$IDHAL_DEMO_FAIL_AT"} \
    "$IDHAL_DEMO_BIN" "$@" &
wait $!
