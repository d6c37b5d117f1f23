#!/usr/bin/env bash
# The main job on the bundled tiny model: compile tests/fixtures/tiny-scout into a bundle and generate
# from it with ONNX Runtime, from token ids, from text, and from images with text. Installs what it needs first (the ONNX Runtime
# library, into .cache/). The tiny model has random weights: its text is gibberish by design.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-onnxruntime.sh
cargo build --release --locked --quiet
bundle=target/bundles/tiny-scout
./target/release/herd inspect tests/fixtures/tiny-scout
./target/release/herd compile tests/fixtures/tiny-scout -o "$bundle" --force
./target/release/herd run "$bundle" --input-ids 1,17,42,99,7 --max-new-tokens 16 --ignore-eos
./target/release/herd run "$bundle" --prompt "Hello, world!" --max-new-tokens 16 --ignore-eos
./target/release/herd run "$bundle" --prompt "Compare <|image|> with <|image|>:" \
    --image tests/fixtures/images/wide.png --image tests/fixtures/images/small.png --max-new-tokens 16 --ignore-eos
