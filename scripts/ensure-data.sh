#!/usr/bin/env bash
# Make sure Fashion-MNIST is where lowbit looks for it; install Debian's package when we can.
set -u
dir="${LOWBIT_DATA_DIR:-/usr/share/datasets/fashion-mnist}"
files="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
have() { for f in $files; do [ -s "$dir/$f" ] || return 1; done; }
have && exit 0
if [ "$dir" = /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "lowbit: installing Debian package dataset-fashion-mnist ..."
  apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || true
  have && exit 0
fi
echo "lowbit: Fashion-MNIST not found in $dir. Install it with 'sudo apt-get install dataset-fashion-mnist'," >&2
echo "        or put the four IDX files ($files) in a folder and set LOWBIT_DATA_DIR or pass --data-dir." >&2
exit 2
