"""`alloy export MODEL_DIR --format onnx|gguf --out PATH`: any loadable HF directory -> ONNX or GGUF."""

from __future__ import annotations

import time

from alloy.fuse.export import EXPORT_FORMATS, export_model


def add_arguments(parser) -> None:
    parser.add_argument("model_dir", help="an HF model directory (config.json + safetensors)")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                        help="onnx (forward pass, dynamic batch and sequence) or gguf (llama.cpp)")
    parser.add_argument("--out", required=True, help="the file to write")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16", "q8_0", "q4_0", "q4_1", "q4_k"),
                        help="weights dtype (default: fp32 for gguf, as stored for onnx); gguf also takes the block "
                        "formats q8_0, q4_0, q4_1, q4_k (token table and output matrix in q8_0, norms fp32)")
    parser.add_argument("--force", action="store_true", help="replace a previous export of the same format at --out")


def run(args) -> int:
    start = time.monotonic()
    out = export_model(args.model_dir, args.out, format=args.format, dtype=args.dtype,
                       overwrite=args.force)
    print(f"exported {args.model_dir} -> {out} ({args.format}, {out.stat().st_size / 1e6:,.1f} MB "
          f"in {time.monotonic() - start:.1f} s)")
    return 0
