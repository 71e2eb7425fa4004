"""Training-step tokens/s on one device: Alloy's Transformer vs. transformers' LlamaForCausalLM.

Same spec (built through LlamaConfig), same batch, sequence, dtype and optimizer (AdamW), one
process each. Model FLOP utilisation is against this machine's measured matmul rate.
Run one measurement: python -m bench.train --impl alloy --dtype bf16 [--quick]
"""

from __future__ import annotations

import argparse
import json
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

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = forward(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocator, kernels
    started = time.perf_counter()
    for _ in range(steps):
        step()
    step_s = (time.perf_counter() - started) / steps
    params = sum(p.numel() for p in model.parameters())
    h, layers = SIZES[size][0], SIZES[size][1]
    # 6 N per token for the matmuls, plus attention scores and values (fwd 4*T*h per layer, x3 with bwd)
    flops_per_token = 6 * params + 12 * layers * seq * h
    return {"tokens_per_s": batch * seq / step_s, "step_s": step_s, "achieved_flops": flops_per_token * batch * seq / step_s,
            "params": params}


def variants(quick: bool) -> dict[str, list[str]]:
    size = ["--quick"] if quick else []
    return {f"{impl}-{dtype}": ["--impl", impl, "--dtype", dtype, *size]
            for dtype in ("fp32", "bf16") for impl in ("alloy", "transformers")}


PAIRS = [(f"alloy-{d}", f"transformers-{d}", "tokens_per_s") for d in ("fp32", "bf16")]


def headline(summary: dict, machine_flops: dict[str, float]) -> dict:
    out = {}
    for dtype in ("fp32", "bf16"):
        a = summary["figures"][f"alloy-{dtype}"]
        b = summary["figures"][f"transformers-{dtype}"]
        out[f"alloy_tokens_per_s_{dtype}"] = a["tokens_per_s"]["median"]
        out[f"baseline_tokens_per_s_{dtype}"] = b["tokens_per_s"]["median"]
        out[f"ratio_{dtype}"] = summary["ratios"][f"alloy-{dtype}/transformers-{dtype}:tokens_per_s"]["median"]
        if machine_flops.get(dtype):
            out[f"alloy_mfu_{dtype}"] = a["achieved_flops"]["median"] / machine_flops[dtype]
            out[f"baseline_mfu_{dtype}"] = b["achieved_flops"]["median"] / machine_flops[dtype]
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
