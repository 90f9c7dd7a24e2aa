#!/usr/bin/env bash
# Agent benchmarks, printed as figures (never asserted): static binary size, peak RSS and the time
# of a verify + no-op run, on a 1 MiB manifest with 200 scriptlets served by `idhal serve` on
# 127.0.0.1. Needs hyperfine and GNU time (scripts/setup-debian.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/agent-size.sh
dir=${CARGO_TARGET_DIR:-$PWD/target}
agent=$dir/idhal-bootstrap-plain
cargo build -q --locked --release -p idhal-server-tools
idhal=$dir/release/idhal

work=$(mktemp -d)
server_pid=""
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

# 200 scriptlets of ~5 KiB (1 MiB in all); the last one records the agent's own peak RSS
# (VmHWM of its parent) at the end of the run, when the whole manifest is in memory.
mkdir -p "$work/scriptlets"
pad=$(head -c 3800 /dev/zero | tr '\0' 'x')
for i in $(seq -w 0 198); do
    { echo "#!/bin/sh"; for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13; do echo "# $pad" | cut -c1-400; done; echo ":"; } \
        > "$work/scriptlets/$i-noop.sh"
done
printf '#!/bin/sh\ngrep VmHWM /proc/$PPID/status > %s/hwm\n' "$work" > "$work/scriptlets/199-hwm.sh"
"$idhal" keygen --dir "$work/keys" --no-passphrase >/dev/null
"$idhal" sign --key "$work/keys/idhal.key" --out "$work/pub" "$work/scriptlets" >/dev/null
printf 'manifest: %d bytes, %d scriptlets\n' "$(stat -c %s "$work/pub/manifest")" \
    "$(grep -c '^scriptlet ' "$work/pub/manifest" || true)"
cargo run -q --locked --release -p idhal-manifest --example verify_bench -- \
    "$work/keys/idhal.pub" "$work/pub/manifest" "$work/pub/manifest.minisig"

"$idhal" serve --root "$work/pub" --listen 127.0.0.1:0 > "$work/serve.out" 2>/dev/null &
server_pid=$!
for _ in $(seq 100); do grep -q listening "$work/serve.out" && break; sleep 0.05; done
url=$(sed -n 's/^listening on //p' "$work/serve.out")
printf 'retries = 0\n' > "$work/bootstrap.conf"
run=("$agent" run --config "$work/bootstrap.conf" --server "$url" --key "$work/keys/idhal.pub"
     --state-dir "$work/state")

/usr/bin/time -f '%e %M' -o "$work/time1" "${run[@]}" 2>/dev/null
read -r secs _ < "$work/time1"
echo "first run (fetch + verify + 200 scriptlets): ${secs}s wall; agent peak RSS $(awk '{print $2, $3}' "$work/hwm")"
/usr/bin/time -f '%M' -o "$work/time2" "${run[@]}" 2>/dev/null
echo "no-op run (all done): peak RSS $(cat "$work/time2") KiB"
for _ in $(seq 100); do "${run[@]}" 2>&1 | sed -n 's/.*(\([0-9.]*\) ms after download)/\1/p'; done > "$work/local"
sort -n "$work/local" | awk '{a[NR]=$1} END {printf "verify + no-op run (all 200 done), after download: median %.2f ms, p90 %.2f ms, min %.2f ms (n=%d)\n", a[int(NR/2)+1], a[int(NR*0.9)], a[1], NR}'
hyperfine -N --warmup 5 --runs 100 --export-json "$work/h.json" "${run[*]}" >/dev/null 2>&1
python3 - "$work/h.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"][0]
t = sorted(r["times"])
print("no-op run, whole process incl. exec and loopback fetch of 1 MiB: median %.2f ms, p90 %.2f ms, "
      "min %.2f ms, agent CPU user %.2f ms + sys %.2f ms (n=%d)"
      % (r["median"] * 1e3, t[int(len(t) * 0.9)] * 1e3, r["min"] * 1e3, r["user"] * 1e3, r["system"] * 1e3, len(t)))
PY
