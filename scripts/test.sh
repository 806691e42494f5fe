#!/usr/bin/env bash
# One command on a fresh machine: install what is missing, fetch the MiniLM weights (cached;
# see scripts/fetch-minilm.sh) and run the whole test suite.
# Real-data tests read ../shared/data/esci and ../shared/data/esci-graded (or
# $MERGE_INDEXER_ESCI_DIR / $MERGE_INDEXER_ESCI_GRADED_DIR) and skip with a message if absent;
# the MiniLM tests skip with a message if the model could not be fetched. With
# MERGE_INDEXER_REQUIRE_TEST_INPUTS=1 (CI) a missing input fails instead.
# Same profile and features as scripts/demo.sh (`cargo run`), so the two share one build.
# `scripts/test.sh --build-only` compiles the same test binaries and runs nothing (CI builds them
# while its Kafka-compatible test broker compiles, then runs this script without the flag).
set -euo pipefail
cd "$(dirname "$0")/.."
build_only=false
case "${1:-}" in
  "") ;;
  --build-only) build_only=true ;;
  *) echo "usage: scripts/test.sh [--build-only]" >&2; exit 2 ;;
esac
scripts/ensure-deps.sh
# One suite: `cargo test` with these arguments, or its build alone.
suite() {
  if $build_only; then
    cargo test --locked --no-run "$@"
  else
    cargo test --locked "$@" -- --test-threads=2
  fi
}
if ! $build_only && ! scripts/fetch-minilm.sh; then
  if [[ "${MERGE_INDEXER_REQUIRE_TEST_INPUTS:-}" == 1 ]]; then
    echo "error: all-MiniLM-L6-v2 could not be fetched and MERGE_INDEXER_REQUIRE_TEST_INPUTS=1" >&2
    exit 1
  fi
  echo "warning: all-MiniLM-L6-v2 could not be fetched; the MiniLM tests will be skipped" >&2
fi
suite
