#!/usr/bin/env bash
# Installs the ONNX Runtime shared library herd's runtime loads (onnxruntime 1.31.1, CPU) into the
# project-local cache .cache/onnxruntime/, from the PyPI wheel (pip verifies the wheel's hash against
# PyPI). Idempotent: does nothing when the library is already there. Needs python3 with pip.
set -euo pipefail
cd "$(dirname "$0")/.."

version=1.31.1
dest=.cache/onnxruntime
lib="$dest/libonnxruntime.so.$version"
if [ -f "$lib" ]; then
  exit 0
fi
case "$(uname -s)-$(uname -m)" in
  Linux-x86_64|Linux-aarch64) ;;
  *) echo "install-onnxruntime: unsupported platform $(uname -s)-$(uname -m); set ORT_DYLIB_PATH to an ONNX Runtime $version library" >&2; exit 1 ;;
esac
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "install-onnxruntime: downloading onnxruntime==$version from PyPI" >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: "onnxruntime==$version" -d "$tmp"
wheel=$(ls "$tmp"/onnxruntime-*.whl)
python3 - "$wheel" "$tmp/lib" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.startswith("onnxruntime/capi/libonnxruntime.so."))
    with z.open(name) as src, open(out, "wb") as dst:
        dst.write(src.read())
PY
mv "$tmp/lib" "$lib.partial"
mv "$lib.partial" "$lib"
echo "install-onnxruntime: installed $lib" >&2
