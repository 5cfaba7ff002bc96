#!/usr/bin/env bash
# Runs every test on a fresh machine: builds the release binary (tests reuse it), fetches and
# verifies the pinned model files of both backbones into GUARDIAN_HOME (idempotent), starts the
# local Kafka-protocol broker and Redis (ops/services.sh; the broker is built once per machine),
# then runs the unit and end-to-end tests against the real model, broker and Redis. Needs: a Rust
# toolchain, a C compiler, make, python3 + pip, and access to crates.io, PyPI (and Debian's
# packages when Redis is missing) for the first run.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1 || { echo "error: $1 is required ($2)" >&2; exit 1; }; }
need cargo "install Rust from https://rustup.rs"
need cc "Debian: apt-get install build-essential"
need python3 "Debian: apt-get install python3 python3-pip (used by 'guardian models fetch')"
need make "Debian: apt-get install make (librdkafka's bundled build)"

cargo fmt --all -- --check
cargo build --release --locked
./target/release/guardian models fetch
./target/release/guardian models verify
# The optional second backbone, for tests/gemma.rs (1.2 GB, verified like the default).
./target/release/guardian models fetch --backbone embeddinggemma-300m
./target/release/guardian models verify --backbone embeddinggemma-300m
bash ops/services.sh up
cargo test --release --locked
