#!/usr/bin/env bash
# One command on a fresh machine: install what is missing and run the whole test suite.
# The real-data test reads ../shared/data/esci (or $MERGE_INDEXER_ESCI_DIR) and skips if absent.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
exec cargo test --locked -- --test-threads=2
