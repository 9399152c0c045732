#!/bin/sh
# Installs the build tree $1 into a scratch prefix, builds the consumer in
# this folder against it and runs it.
set -eu
build=$1
source_dir=$(cd "$(dirname "$0")" && pwd)
scratch=$build/install-test
rm -rf "$scratch"
cmake --install "$build" --prefix "$scratch/prefix" >/dev/null
cmake -S "$source_dir" -B "$scratch/consumer" -DCMAKE_PREFIX_PATH="$scratch/prefix" \
  -DKVBOUNCE_CONSUMER_SOURCE="$source_dir/../session/public_api_test.cc" >/dev/null
cmake --build "$scratch/consumer" >/dev/null
"$scratch/consumer/consumer"
