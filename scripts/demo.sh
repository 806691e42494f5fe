#!/usr/bin/env bash
# One command on a fresh machine: install what is missing, build, and run the demo on the
# embedded default (embedded Kafka broker, ./state, CPU backend). Extra arguments go to `demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
exec cargo run --locked -- demo "$@"
