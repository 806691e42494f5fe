#!/usr/bin/env bash
# One command on a fresh machine: install what is missing, fetch the MiniLM weights (cached;
# see scripts/fetch-minilm.sh) and run the whole test suite.
# Real-data tests read ../shared/data/esci and ../shared/data/esci-graded (or
# $MERGE_INDEXER_ESCI_DIR / $MERGE_INDEXER_ESCI_GRADED_DIR) and skip with a message if absent;
# the MiniLM tests skip with a message if the model could not be fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
if ! scripts/fetch-minilm.sh; then
  echo "warning: all-MiniLM-L6-v2 could not be fetched; the MiniLM tests will be skipped" >&2
fi
cargo test --locked -- --test-threads=2
# The model code again on burn's Flex CPU backend (the `flex` feature): the unit tests, the DocID
# tests and the MiniLM parity test.
cargo test --locked --features flex --lib --test docids --test docid_assignment --test train_docids \
  --test minilm_reference -- --test-threads=2
