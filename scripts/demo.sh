#!/usr/bin/env bash
# The README's main command. Today it shows the signed-manifest loop on this machine: keygen,
# sign, serve on 127.0.0.1, the static agent pinning the key, verifying and running scriptlets
# once, and refusing a tampered manifest. (Booting a VM to Alive joins when enrollment, hooks and
# the QEMU harness land.) Everything runs in a temp dir that is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "setup (installs what is missing) and build"
scripts/setup-debian.sh
cargo build -q --locked --release -p idhal-server-tools
cargo build -q --locked --release --target x86_64-unknown-linux-musl -p idhal-bootstrap
idhal=$PWD/target/release/idhal
agent=$PWD/target/x86_64-unknown-linux-musl/release/idhal-bootstrap

work=$(mktemp -d)
server_pid=""
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

step "idhal keygen: the project's signing key"
"$idhal" keygen --dir "$work/keys" --no-passphrase

step "two scriptlets, signed into a manifest"
mkdir -p "$work/scriptlets"
cat > "$work/scriptlets/000-hello.sh" <<'SH'
#!/bin/sh
echo "hello from scriptlet $IDHAL_SCRIPTLET (manifest serial $IDHAL_SERIAL)"
SH
cat > "$work/scriptlets/010-every-boot.sh" <<'SH'
#!/bin/sh
# idhal: frequency=boot
echo "runs once per boot"
SH
"$idhal" sign --key "$work/keys/idhal.key" --out "$work/pub" "$work/scriptlets"

step "idhal serve on 127.0.0.1 (ephemeral port)"
"$idhal" serve --root "$work/pub" --listen 127.0.0.1:0 > "$work/serve.out" 2>"$work/serve.log" &
server_pid=$!
for _ in $(seq 100); do grep -q listening "$work/serve.out" && break; sleep 0.05; done
url=$(sed -n 's/^listening on //p' "$work/serve.out")
echo "serving $url"
printf 'server = %s\nkey = %s\nstate_dir = %s\nretries = 0\n' \
    "$url" "$work/keys/idhal.pub" "$work/node" > "$work/bootstrap.conf"
node() { "$agent" "$@" --config "$work/bootstrap.conf"; }

step "first boot: pin the baked-in key, verify, run both scriptlets"
node run || true
cat "$work/node/scriptlets/000-hello/log"
step "second run: nothing is due"
node run
step "a tampered manifest is refused; nothing runs"
sed -i 's/hello from/HACKED/' "$work/pub/manifests/1"
node run || echo "(exit code $?)"
step "idhal-bootstrap status"
node status || true
step "done (temp files removed)"
