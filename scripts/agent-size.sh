#!/usr/bin/env bash
# Builds the static agent with and without HTTPS and prints its size. With --check, fails if a
# budget is exceeded (640 KiB plain, 1.5 MiB with HTTPS): sizes are deterministic, unlike timings.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-musl
dir=${CARGO_TARGET_DIR:-target}
bin=$dir/$target/release/idhal-bootstrap
status=0
for variant in plain https; do
    features=(); budget=$((640 * 1024))
    if [ $variant = https ]; then features=(--features https); budget=$((1536 * 1024)); fi
    cargo build -q --locked --release --target $target -p idhal-bootstrap "${features[@]}"
    size=$(stat -c %s "$bin")
    cp "$bin" "$dir/idhal-bootstrap-$variant"
    printf 'agent %-5s %8d bytes (%4d KiB), budget %4d KiB, %s\n' $variant "$size" $((size / 1024)) \
        $((budget / 1024)) "$(file -b "$bin" | cut -d, -f1-2)"
    if [ "${1:-}" = --check ] && [ "$size" -gt "$budget" ]; then
        echo "agent $variant is over its size budget" >&2; status=1
    fi
done
exit $status
