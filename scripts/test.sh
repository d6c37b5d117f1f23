#!/usr/bin/env bash
# Runs herd's whole test suite on a fresh machine: formatting, lints, then every cargo test.
# Installs what the tests need first (the ONNX Runtime library, into .cache/; idempotent).
# Tests never need Python packages, torch or a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-onnxruntime.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The GPU providers (CUDA, TensorRT) must keep building, though no GPU exists here to run them.
cargo clippy -p herd-runtime --features tensorrt --locked -- -D warnings
cargo build --features tensorrt --locked
cargo test --workspace --locked
echo "test.sh: target/ holds $(du -sh target | cut -f1) after the suite; $(df -h . | awk 'NR==2 {print $4}') left on the disk" >&2
