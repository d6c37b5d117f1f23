#!/usr/bin/env bash
# On a machine with an H100, CUDA 13 (the onnxruntime-gpu 1.31.1 wheel is a CUDA 13 build), TensorRT 10.x and the GPU build of ONNX Runtime 1.31.1: compiles a
# fixture for TensorRT in both MoE lowerings (cuda: MoE nodes on the CUDA EP beside TensorRT; grouped:
# TensorRT alone), builds each engine, runs it, and compares its logits with the CPU bundle's; for
# tiny-scout also an image prompt (vision and decoder engines).
#   ORT_DYLIB_PATH=/path/to/onnxruntime-gpu/libonnxruntime.so.1.31.1 scripts/gpu-check.sh [FIXTURE]
# It cannot run on machines without a GPU (herd's CI has none); there it stops at the first check.
set -euo pipefail
cd "$(dirname "$0")/.."

fixture=${1:-tiny-scout}
command -v nvidia-smi >/dev/null || { echo "gpu-check: no nvidia-smi: this needs an NVIDIA GPU (H100)" >&2; exit 1; }
[ -n "${ORT_DYLIB_PATH:-}" ] || { echo "gpu-check: set ORT_DYLIB_PATH to the GPU build of libonnxruntime 1.31.1" >&2; exit 1; }
ldconfig -p | grep -q 'libnvinfer.so.10' || { echo "gpu-check: TensorRT 10 (libnvinfer.so.10) is not on the loader path" >&2; exit 1; }

cargo build --release --locked --features tensorrt
herd=target/release/herd
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ids=1,17,42,99,7,300,12,5,77,401,3,250

"$herd" compile "tests/fixtures/$fixture" -o "$work/cpu" --moe ort --dtype f32 --max-context 256
"$herd" run "$work/cpu" --input-ids "$ids" --max-new-tokens 8 --ignore-eos --dump-logits "$work/cpu.npy" --json
compare() {
python3 - "$1" "$2" "$3" <<'PY'
import sys
import numpy as np
cpu, trt = np.load(sys.argv[1]), np.load(sys.argv[2])
err, scale = float(np.abs(cpu - trt).max()), float(np.abs(cpu).max())
agree = float((cpu.argmax(-1) == trt.argmax(-1)).mean())
print(f"gpu-check ({sys.argv[3]}): TensorRT f16 vs CPU f32: max error {err:.3e} ({err / scale:.2e} of the logit scale), top-1 agreement {agree:.0%}")
sys.exit(0 if err <= 5e-3 * scale else 1)
PY
}
for moe in cuda grouped; do
    trt="$work/trt-$moe"
    "$herd" compile "tests/fixtures/$fixture" -o "$trt" --target tensorrt-h100 --moe "$moe" --dtype f16 --max-context 256 --max-seq 32
    "$herd" lint "$trt" --target tensorrt
    "$herd" build-engine "$trt"
    "$herd" run "$trt" --input-ids "$ids" --max-new-tokens 8 --ignore-eos --dump-logits "$trt.npy" --json --ep tensorrt
    compare "$work/cpu.npy" "$trt.npy" "token ids, --moe $moe"
    if [ "$fixture" = tiny-scout ]; then
        images=(--image tests/fixtures/images/wide.png --image tests/fixtures/images/small.png)
        prompt="Compare <|image|> with <|image|>:"
        [ -f "$work/cpu-image.npy" ] || "$herd" run "$work/cpu" --prompt "$prompt" "${images[@]}" --max-new-tokens 8 --ignore-eos --dump-logits "$work/cpu-image.npy" --json
        "$herd" run "$trt" --prompt "$prompt" "${images[@]}" --max-new-tokens 8 --ignore-eos --dump-logits "$trt-image.npy" --json --ep tensorrt
        compare "$work/cpu-image.npy" "$trt-image.npy" "images, --moe $moe"
    fi
done
