#!/usr/bin/env bash
# Installs what building and testing merge-indexer needs and is missing on a fresh Debian
# machine (run as root, or with sudo available). Idempotent; quiet when nothing is missing.
#   libclang-dev   bindgen for the bundled RocksDB (librocksdb-sys)
#   g++ make       bundled RocksDB and librdkafka are built from source
#   libssl-dev     TLS/SASL support compiled into librdkafka (secured clusters)
#   zlib1g-dev     librdkafka compression
#   pkg-config     locating the system libraries above
#   curl           the metrics scrape check
#   prometheus     promtool, for `promtool check metrics`            (only with --ci)
#   cmake          building the tansu broker used by the end-to-end test (only with --ci)
#   gdb            thread stacks of a demo that stops making progress in CI  (only with --ci)
set -euo pipefail

packages=(libclang-dev g++ make libssl-dev zlib1g-dev pkg-config curl)
if [[ "${1:-}" == "--ci" ]]; then
  packages+=(prometheus cmake gdb)
fi

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  sudo_cmd=()
  if [[ $(id -u) -ne 0 ]]; then sudo_cmd=(sudo); fi
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust 1.88+ with rustup and re-run" >&2
  exit 1
fi
