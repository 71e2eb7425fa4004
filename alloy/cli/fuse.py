"""`alloy fuse RUN_DIR --out DIR`: a run's checkpoint shards -> one standard model (seed step 4);
with --merge-lora, a LoRA run's adapters folded into its base model."""

from __future__ import annotations

import time

from alloy.fuse import fuse_run
from alloy.fuse.fuse import FORMATS


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="the run's directory (holds checkpoints/step-N/)")
    parser.add_argument("--out", required=True, help="output: a directory (hf) or a file (gguf, onnx)")
    parser.add_argument("--step", type=int, help="the checkpoint step to fuse (default: the latest complete one)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="store weights in this dtype "
                        "(default: as trained)")
    parser.add_argument("--format", default="hf", choices=FORMATS, help="hf (config.json + safetensors), "
                        "gguf (llama.cpp) or onnx (forward pass, dynamic batch and sequence)")
    parser.add_argument("--merge-lora", action="store_true", help="a LoRA run: fold its adapters into the base "
                        "model it fine-tuned (W += alpha/rank * B A) and write that full model")
    parser.add_argument("--force", action="store_true", help="replace a previous output at --out (never "
                        "anything else: a folder holding other files, or the input, is refused)")


def run(args) -> int:
    start = time.monotonic()
    out = fuse_run(args.run_dir, args.out, step=args.step, dtype=args.dtype, format=args.format,
                   overwrite=args.force, merge_lora=args.merge_lora)
    size = sum(p.stat().st_size for p in (out.rglob("*") if out.is_dir() else [out]) if p.is_file())
    what = args.format + (", LoRA merged" if args.merge_lora else "")
    print(f"fused {args.run_dir} -> {out} ({what}, {size / 1e6:,.1f} MB in {time.monotonic() - start:.1f} s)")
    return 0
