#!/usr/bin/env bash
# Installs the Debian 12 packages kvbounce builds with, when any is missing.
# Run as root, or as a user with sudo. CUDA is optional and not installed here:
# when a CUDA toolkit is present the build picks it up by itself.
set -euo pipefail

packages=(
  cmake ninja-build g++ pkg-config
  libgtest-dev libgmock-dev libbenchmark-dev
  libcli11-dev nlohmann-json3-dev
  libucx-dev ucx-utils
  libcpp-httplib-dev      # kvbounce worker --metrics-port
  python3-matplotlib      # kvbounce sweep's plot (tools/plot_sweep.py)
  clang libclang-rt-dev   # libFuzzer and the sanitizer runtimes of clang
  # The Python module (built for Debian's /usr/bin/python3) and its tests.
  python3-dev pybind11-dev python3-pybind11 python3-numpy python3-torch python3-pytest
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "kvbounce: installing ${missing[*]}" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "kvbounce: need root or sudo to install ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
