#!/usr/bin/env bash
# Runs herd's whole test suite on a fresh machine: formatting, lints, then every cargo test.
# Installs what the tests need first (idempotent). Tests never need Python, torch or a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
