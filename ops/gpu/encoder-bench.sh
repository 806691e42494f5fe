#!/usr/bin/env bash
# Encoder benchmark on a GPU machine (one prepared script, run through the device tool).
#
# Prepare here (no GPU needed; cudarc is pinned to the CUDA 13.0 API level):
#   cargo build --release --locked --features cuda       # -> target/release/merge-indexer
#   mkdir -p gpu-carry && cp "$CARGO_TARGET_DIR/release/merge-indexer" gpu-carry/
#   scripts/fetch-minilm.sh                               # models/all-MiniLM-L6-v2
# then run with carry = ["gpu-carry", "models"] and the graded ESCI folder under shared/:
#   ops/gpu/encoder-bench.sh
# Results (text + JSON lines) go to $OUT/encoder-bench.txt.
#
# burn's first CUDA steps compile kernels (~90-100 s cold, ~10 s with ~/.cache/cubecl warm), and
# every new sequence length compiles again: `bench encode` warms up one batch per batch size,
# and this script runs it twice, reporting both, so compile time is visible and excluded.
set -euo pipefail
cd "$(dirname "$0")/../.."
binary="${MERGE_INDEXER_BINARY:-gpu-carry/merge-indexer}"
out="${OUT:-/tmp}/encoder-bench.txt"
for cuda in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/lib/x86_64-linux-gnu; do
  [[ -d "$cuda" ]] && export LD_LIBRARY_PATH="$cuda:${LD_LIBRARY_PATH:-}"
done
export MERGE_INDEXER_MODEL_DIR="${MERGE_INDEXER_MODEL_DIR:-models/all-MiniLM-L6-v2}"
if [[ -d shared/data/esci-graded ]]; then export MERGE_INDEXER_ESCI_GRADED_DIR="$PWD/shared/data/esci-graded"; fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  echo "== first pass (includes kernel compilation)"
  /usr/bin/time -v "$binary" bench encode --encoder minilm --batch-sizes 32,128 --products 1024 2>&1 | grep -vE "INFO|^\s+(Page|Volun|Invol|Swaps|File|Socket|Signals|Average|Exit|Minor|Major|Percent|System|User|Elapsed)" || true
  echo "== second pass (warm)"
  "$binary" bench encode --encoder minilm --batch-sizes 32,128,512 --products 4096 2>&1 | grep -v INFO
  echo "== retrieval quality (same numbers as on the CPU expected, up to float noise)"
  "$binary" bench retrieval --encoder minilm --batch-size 128 2>&1 | grep -v INFO
} | tee "$out"
