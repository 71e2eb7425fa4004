"""Training-step tokens/s on one device: Alloy's Transformer vs. transformers' LlamaForCausalLM.

Same spec (built through LlamaConfig), same batch, sequence, dtype and optimizer (AdamW), one
process each. Model FLOP utilisation is against the matmul rate measured in the same process at
the model's own MLP shape.
Run one measurement: python -m bench.train --impl alloy --dtype bf16 [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

SIZES = {  # (hidden, layers, heads, kv_heads, ffn, vocab, batch, seq)
    "quick": (128, 2, 4, 2, 352, 2048, 2, 64),
    "full": (512, 8, 8, 4, 1376, 8192, 4, 256),
}


def hf_config(size: str):
    import transformers

    h, layers, heads, kv, ffn, vocab, _, _ = SIZES[size]
    return transformers.LlamaConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=kv, intermediate_size=ffn, vocab_size=vocab,
                                    max_position_embeddings=1024, tie_word_embeddings=False)


def make_step(forward, optimizer, ids: torch.Tensor):
    """One next-token training step on `ids` (batch x seq+1): forward, fp32 loss, backward, update."""
    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        logits = forward(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def time_steps(step, steps: int) -> float:
    """Seconds per step over `steps` timed steps, after one untimed warm-up (allocator, kernels)."""
    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def train_flops_per_token(model: torch.nn.Module, layers: int, seq: int, hidden: int) -> tuple[int, int]:
    """(matmul parameters, training FLOPs per token): 6 N for the matmuls (the embedding table is a
    lookup, not a matmul: left out), plus attention scores and values (fwd 4*T*h per layer, x3 with bwd)."""
    params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    return params, 6 * params + 12 * layers * seq * hidden


def build(impl: str, size: str, dtype: torch.dtype):
    torch.manual_seed(0)
    config = hf_config(size)
    if impl == "transformers":
        import transformers

        model = transformers.LlamaForCausalLM(config)
        forward = lambda ids: model(input_ids=ids).logits  # noqa: E731
    else:
        import alloy

        model = alloy.Transformer(alloy.ModelSpec.from_hf_config(config.to_dict()))
        forward = model
    return model.to(dtype).train(), forward


def measure(impl: str, size: str, dtype_name: str, steps: int) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model, forward = build(impl, size, dtype)
    _, _, _, _, _, vocab, batch, seq = SIZES[size]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(1))

    step_s = time_steps(make_step(forward, optimizer, ids), steps)
    h, layers, ffn = SIZES[size][0], SIZES[size][1], SIZES[size][4]
    params, flops_per_token = train_flops_per_token(model, layers, seq, h)
    return {"tokens_per_s": batch * seq / step_s, "step_s": step_s, "achieved_flops": flops_per_token * batch * seq / step_s,
            "matmul_flops": matmul_rate(batch * seq, h, ffn, dtype), "params": params}


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype) -> float:
    """FLOP/s of this model's own MLP matmul shape, best of 5: the rate MFU is measured against
    (the devices profile's probe shape runs slower than these GEMMs, which would put MFU over 1)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    best_s = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * m * k * n / best_s


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def dtypes(quick: bool, bench: str = "train") -> tuple[str, ...]:
    """fp32 and bf16; at full size bf16 only where this CPU has a fast bf16 matmul (the devices
    profile). Without one a full bf16 step takes ~1 min on either side and shows nothing."""
    if quick:
        return ("fp32", "bf16")
    try:
        from alloy.devices.local import profile

        slow = next(d for d in profile().devices if d.kind == "cpu").slow_dtypes
    except Exception:  # no profile: run both
        return ("fp32", "bf16")
    if "bf16" in slow:
        print(f"({bench}: bf16 left out at full size: {slow['bf16']})", file=sys.stderr)
        return ("fp32",)
    return ("fp32", "bf16")


def variants(quick: bool) -> dict[str, list[str]]:
    size = ["--quick"] if quick else []
    return {f"{impl}-{dtype}": ["--impl", impl, "--dtype", dtype, *size]
            for dtype in dtypes(quick) for impl in ("alloy", "transformers")}


PAIRS = [(f"alloy-{d}", f"transformers-{d}", "tokens_per_s") for d in ("fp32", "bf16")]


def headline(summary: dict, machine_flops: dict[str, float]) -> dict:
    out = {}
    for dtype in ("fp32", "bf16"):
        if f"alloy-{dtype}" not in summary["figures"]:
            continue
        a = summary["figures"][f"alloy-{dtype}"]
        b = summary["figures"][f"transformers-{dtype}"]
        out[f"alloy_tokens_per_s_{dtype}"] = a["tokens_per_s"]["median"]
        out[f"baseline_tokens_per_s_{dtype}"] = b["tokens_per_s"]["median"]
        out[f"ratio_{dtype}"] = summary["ratios"][f"alloy-{dtype}/transformers-{dtype}:tokens_per_s"]["median"]
        # one denominator for both sides: the best GEMM rate either process measured (a single
        # process's probe is as noisy as its steps)
        peak = max(a["matmul_flops"]["max"], b["matmul_flops"]["max"])
        out[f"alloy_mfu_{dtype}"] = a["achieved_flops"]["median"] / peak
        out[f"baseline_mfu_{dtype}"] = b["achieved_flops"]["median"] / peak
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["alloy", "transformers"], required=True)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(measure(args.impl, "quick" if args.quick else "full", args.dtype, args.steps)))


if __name__ == "__main__":
    main()
