"""Training tokens/s and MFU on one device: Alloy's Transformer vs. transformers' LlamaForCausalLM.

Same spec (built through LlamaConfig), same batch and sequence, same dtype (bf16 weights,
as bench/train.py), AdamW. Rounds alternate A B A B with a fresh model each time. MFU is taken
against the H200's 989 TFLOP/s dense bf16 datasheet peak and against this device's measured
bf16 matmul rate; FLOPs per token are 6 x (parameters less the input embedding, a lookup) plus
attention's 12 x layers x seq x hidden.
Run: python -m bench.gpu.train --device cuda [--rounds 2] [--out train.json]
"""

from __future__ import annotations

import sys
import time

import torch

from bench.gpu import common
from bench.gpu.machine import matmul_flops_per_s
from bench.train import make_step, train_flops_per_token

IMPLS = ("alloy", "transformers")
SHAPES = {"1b": (8, 2048), "tiny": (2, 32)}  # (batch, seq): 16k tokens a step on the GPU
MATMUL_N = {"1b": 8192, "tiny": 256}


def build(impl: str, config, device: torch.device, dtype: torch.dtype):
    """A freshly initialised model on `device` in `dtype`, and its ids -> logits function."""
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: no 1B-parameter copy from the host
        if impl == "transformers":
            import transformers

            model = transformers.LlamaForCausalLM(config)
            # use_cache=False: what a training loop passes; a KV cache is dead weight here.
            forward = lambda ids: model(input_ids=ids, use_cache=False).logits  # noqa: E731
        else:
            import alloy

            model = alloy.Transformer(common.alloy_spec(config))
            forward = model
    return model.to(dtype).train(), forward


def measure(impl: str, config, device, dtype, batch: int, seq: int, steps: int) -> dict:
    model, forward = build(impl, config, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)

    step = make_step(forward, optimizer, ids)

    for _ in range(2):  # warm-up: allocator, cuBLAS / flash-attention kernel choice, AdamW state
        step()
    common.sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    common.sync(device)
    step_s = (time.perf_counter() - started) / steps
    tokens = batch * seq
    out = {"impl": impl, "step_s": step_s, "tokens_per_s": tokens / step_s,
           "achieved_flops_per_s": train_flops_per_token(model, config.num_hidden_layers, seq,
                                                          config.hidden_size)[1] * tokens / step_s,
           "params": sum(p.numel() for p in model.parameters()), "final_loss": loss.item()}
    if impl == "transformers":
        out["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    del model, optimizer, forward
    common.free(device)
    return out


def main(argv=None) -> int:
    p = common.parser(__doc__, "A B rounds (default 2; tiny 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per sample (default 8; tiny 2)")
    args = p.parse_args(argv)
    device = common.check_args(p, args)
    size = "tiny" if args.tiny else "1b"
    rounds, steps = args.rounds or (1 if args.tiny else 2), args.steps or (2 if args.tiny else 8)
    batch, seq = SHAPES[size]
    dtype = common.DTYPES[args.dtype]
    config = common.llama_config(size)
    record = common.Record("train", args, size=size, config=common.SIZES[size], batch=batch, seq=seq,
                           dtype=args.dtype, steps=steps, rounds=rounds,
                           peak_flops_per_s=common.H200_PEAK_BF16_FLOPS_PER_S)
    record.doc["gpu"] = common.gpu_name(device)
    measured = matmul_flops_per_s(device, dtype, MATMUL_N[size])
    record.doc["measured_matmul_flops_per_s"] = measured
    record.doc["matmul_n"] = MATMUL_N[size]
    common.free(device)
    for r in record.rounds(rounds):
        for impl in IMPLS:
            try:
                sample = measure(impl, config, device, dtype, batch, seq, steps)
            except Exception as err:  # the other side still runs; the error is in the record
                record.error(f"round {r} {impl}", err)
                common.free(device)
                continue
            sample["round"] = r
            sample["mfu_vs_peak"] = sample["achieved_flops_per_s"] / common.H200_PEAK_BF16_FLOPS_PER_S
            sample["mfu_vs_measured"] = sample["achieved_flops_per_s"] / measured
            record.add(sample)
    return record.finish(summary=summarize(record.doc["samples"]))


def summarize(samples: list[dict]) -> dict:
    by = {impl: [s for s in samples if s["impl"] == impl] for impl in IMPLS}
    out = {impl: {k: common.stats([s[k] for s in rows])
                  for k in ("tokens_per_s", "mfu_vs_peak", "mfu_vs_measured")} for impl, rows in by.items()}
    rounds = sorted({s["round"] for s in by["alloy"]} & {s["round"] for s in by["transformers"]})
    pick = lambda impl: [next(s["tokens_per_s"] for s in by[impl] if s["round"] == r) for r in rounds]  # noqa: E731
    out["ratio_tokens_per_s"] = common.pairwise_ratios(pick("alloy"), pick("transformers"))
    return out


if __name__ == "__main__":
    sys.exit(main())
