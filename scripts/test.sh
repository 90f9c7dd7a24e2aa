#!/usr/bin/env bash
# idhal's whole test suite, exactly as CI runs it (.ci/run calls this). On a fresh Debian 12
# machine it installs what it needs first. Runs as root: the tests start OpenVPN (tun),
# PostgreSQL and OAR as their own users, DNS servers and QEMU guests, all on 127.0.0.1.
#
# Under this command a test that cannot run (a package missing, not root) FAILS, it never skips:
# IDHAL_TEST_STRICT=1 is exported before anything else, and every test that needs something
# asks idhal-test-support's one rule (test-support/src/lib.rs). A plain `cargo test` of a
# developer skips such tests with a loud SKIPPED line instead.
set -euo pipefail
export IDHAL_TEST_STRICT=1
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

if [ "$(id -u)" != 0 ]; then
    echo "scripts/test.sh must run as root: the OpenVPN, OAR/PostgreSQL and VM tests need it, and" >&2
    echo "here they fail rather than skip. Run: sudo env \"PATH=\$PATH\" bash scripts/test.sh" >&2
    exit 1
fi

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
