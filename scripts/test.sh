#!/usr/bin/env bash
# idhal's whole test suite, exactly as CI runs it (.ci/run calls this). On a fresh Debian 12
# machine it installs what it needs first. Run as root: the tests start OpenVPN, OAR/PostgreSQL
# and DNS servers on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

step() { printf '\n=== %s\n' "$*"; }

step "setup"
scripts/setup-debian.sh

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy -p idhal-bootstrap --features https --all-targets --locked -- -D warnings

step "tests"
cargo test --workspace --locked
cargo test -p idhal-bootstrap --features https --locked --test https

step "agent size budget (static musl, stripped)"
scripts/agent-size.sh --check

step "fuzz (briefly)"
scripts/fuzz.sh "${IDHAL_FUZZ_SECONDS:-20}"

step "all tests passed"
