#!/usr/bin/env bash
# The main job on the embedded default, no Kafka and no Redis: builds guardian, fetches and
# verifies the model files (once), and screens the bundled example queries (JSONL in, verdicts
# out on stdout, a summary on stderr). Extra arguments go to `guardian screen`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
./target/release/guardian models fetch
exec ./target/release/guardian screen --input examples/queries.jsonl "$@"
