#!/usr/bin/env bash
# Installs what idhal's build, tests and demo need on a Debian 12 machine: the Debian packages in
# scripts/apt-packages.txt, the musl target, cargo-fuzz. Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi

mapfile -t pkgs < <(grep -v '^[[:space:]]*\(#\|$\)' scripts/apt-packages.txt)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    # Quietly: apt's and debconf's chatter goes to a log, shown only when something fails.
    log=$(mktemp /tmp/idhal-setup-apt.XXXXXX)
    # Services started by postinst scripts are not wanted (the tests start their own, on 127.0.0.1).
    if ! { $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}"; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "setup: installing ${missing[*]} failed (apt-get's output above)" >&2
        exit 1
    fi
    rm -f "$log"
fi

if ! command -v cargo >/dev/null; then
    echo "setup: no cargo found. Install Rust >= 1.89 with rustup (https://rustup.rs), then re-run." >&2
    exit 1
fi
if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
    echo "setup: adding the x86_64-unknown-linux-musl target"
    rustup target add x86_64-unknown-linux-musl
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "setup: installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi
echo "setup: ok"
