#!/usr/bin/env bash
# MERGE training-step benchmark on a GPU machine: our burn step (`--features cuda` build) and,
# in the same lease, the PyTorch reference `merge_step_torch.py` at the same shapes (2048
# anchors, 8192 rows, 4 x 256 codes, latent 32), eager and torch.compile; prints the ratios.
#
# Prepare here:
#   cargo build --release --locked --features cuda
#   mkdir -p gpu-carry && cp "$CARGO_TARGET_DIR/release/merge-indexer" gpu-carry/
#   cp ../shared/bench/merge_step_torch.py gpu-carry/     # the reference, unedited
# run with carry = ["gpu-carry"]:  ops/gpu/docid-step.sh      (results in $OUT/docid-step.txt)
#
# burn's first CUDA steps compile kernels (~90-100 s cold): 100 untimed warm-up steps first.
set -euo pipefail
cd "$(dirname "$0")/../.."
binary="${MERGE_INDEXER_BINARY:-gpu-carry/merge-indexer}"
reference="${MERGE_STEP_TORCH:-gpu-carry/merge_step_torch.py}"
out="${OUT:-/tmp}/docid-step.txt"
for cuda in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64; do
  [[ -d "$cuda" ]] && export LD_LIBRARY_PATH="$cuda:${LD_LIBRARY_PATH:-}"
done
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
  for dim in 384 768; do
    "$binary" bench docid-step --dim "$dim" --warm-up 100 --steps 50 --torch-reference "$reference" 2>&1 | grep -v INFO
    python3 "$reference" --device cuda --dim "$dim" --compile 2>&1 | tail -1 || echo "torch.compile unavailable"
  done
} | tee "$out"
