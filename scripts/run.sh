#!/usr/bin/env bash
# kvbounce's main job on this machine: builds the optimized CLI and runs its
# default benchmark. Installs its own Debian packages first. Extra arguments go
# to the command, e.g. ./scripts/run.sh --model deepseek-v3 --json
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)" --target kvbounce
exec out/release/tools/kvbounce bench "$@"
