#!/usr/bin/env bash
# Builds kvbounce and runs every test: the normal build, AddressSanitizer +
# UndefinedBehaviorSanitizer, ThreadSanitizer (the tests labelled
# `concurrency`) and the libFuzzer targets for a bounded time. Installs its
# own Debian packages first. Exits non-zero on the first failure.
#
#   ./scripts/test.sh              # everything, as CI runs it
#   ./scripts/test.sh release asan # only the named presets
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh

presets=("$@")
[ ${#presets[@]} -gt 0 ] || presets=(release asan tsan fuzz)
jobs=$(nproc)

for preset in "${presets[@]}"; do
  echo "=== kvbounce: ${preset} ==="
  start=$(date +%s)
  cmake --preset "${preset}" >/dev/null
  cmake --build --preset "${preset}" -j "${jobs}"
  ctest --preset "${preset}" -j "${jobs}"
  echo "=== kvbounce: ${preset} passed in $(( $(date +%s) - start )) s ==="
done
