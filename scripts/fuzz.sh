#!/usr/bin/env bash
# Runs each cargo-fuzz target for a short time (default 20 s each). cargo-fuzz needs nightly
# features; RUSTC_BOOTSTRAP lets the stable toolchain provide them.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-20}
export RUSTC_BOOTSTRAP=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Every run starts from the golden vectors and refusal fixtures (manifest/tests/data).
./seed.sh
for t in manifest_parse signature_verify enroll_parse rotation_check renew_parse; do
    if cargo fuzz run --release "$t" -- -max_total_time="$seconds" -max_len=65536 >"$log" 2>&1; then
        echo "fuzz $t: $(grep -E '^Done' "$log")"
    else
        tail -n 40 "$log"
        echo "fuzz target $t FAILED (crash input under fuzz/artifacts/$t)" >&2
        exit 1
    fi
done
