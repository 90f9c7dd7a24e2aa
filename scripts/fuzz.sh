#!/usr/bin/env bash
# Runs each cargo-fuzz target for a short time (default 20 s each). cargo-fuzz needs nightly
# features; RUSTC_BOOTSTRAP lets the stable toolchain provide them.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-20}
export RUSTC_BOOTSTRAP=1
for t in manifest_parse signature_verify; do
    mkdir -p "corpus/$t"
    cargo fuzz run --release "$t" -- -max_total_time="$seconds" -max_len=65536 2>&1 | tail -n 3
done
