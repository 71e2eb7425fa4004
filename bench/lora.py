"""LoRA training tokens/s on one device: Alloy's LoRA vs. Alloy's full fine-tuning vs. transformers + PEFT.

QLoRA (alloy-qlora: the same adapters over a Q4_0 base) is measured beside them against Alloy's LoRA.

bench.train's spec, sizes, batch, sequence, token ids, dtype handling (the whole model cast to
the dtype) and step. LoRA is rank 16, alpha 32, on every attention and MLP linear (q, k, v, o,
gate, up, down), no dropout, the adapters in the model's dtype on both sides (PEFT's default
would upcast bf16 adapters to fp32); AdamW over the trainable parameters only. One process per
measurement, so each records its own peak RSS: `training_rss_bytes` is what building the model
and the steps added to the process's peak after the imports (LoRA's other saving: no gradient
and no AdamW state for the frozen base).
Run one measurement: python -m bench.lora --impl alloy-lora --dtype bf16 [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys

import torch

from bench.train import SIZES, build, dtypes, hf_config, make_step, time_steps

RANK, ALPHA = 16, 32.0
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IMPLS = ("alloy-lora", "alloy-qlora", "alloy-full", "peft")
QLORA_FORMAT = "q4_0"  # alloy-qlora: the frozen block linears as Q4_0 blocks (alloy.model.lora.quantize_base)
MAY_CRASH = ("peft-",)  # a transformers / peft pairing that breaks is reported, not fatal


def build_impl(impl: str, size: str, dtype: torch.dtype):
    """(model, forward) in train mode, the base cast to `dtype`, adapters (if any) in `dtype` too."""
    if impl == "peft":
        import peft

        base, _ = build("transformers", size, dtype)
        config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=PEFT_TARGETS, lora_dropout=0.0)
        model = peft.get_peft_model(base, config, autocast_adapter_dtype=False)
        return model, lambda ids: model(input_ids=ids).logits
    if impl == "alloy-qlora":  # as a training worker builds it: layer by layer, never the fp32 base whole
        return _qlora(size, dtype)
    model, forward = build("alloy", size, dtype)
    if impl == "alloy-lora":
        from alloy.model.lora import LoraConfig, apply_lora

        apply_lora(model, LoraConfig(rank=RANK, alpha=ALPHA))  # targets: every default linear
    return model, forward


def _qlora(size: str, dtype: torch.dtype):
    from alloy.runtime.build import build_stage_model
    from alloy.spec import ModelSpec

    spec = ModelSpec.from_hf_config(hf_config(size).to_dict())
    model = build_stage_model(spec, (0, spec.num_layers), embed=True, head=True, init_dir=None, seed=0,
                              lora={"rank": RANK, "alpha": ALPHA, "quantize_base": QLORA_FORMAT})
    model = model.to(dtype)  # the adapters, embeddings, norms and head; the blocks stay bytes
    return model, model


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def measure(impl: str, size: str, dtype_name: str, steps: int) -> dict:
    # every import before the RSS mark, so it counts the model and the steps only; transformers
    # loads its model modules lazily, on first touch (~160 MB), which every impl does via LlamaConfig
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: F401

    import alloy.model.lora  # noqa: F401

    if impl == "peft":
        import peft  # noqa: F401
    rss_before = peak_rss_bytes()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model, forward = build_impl(impl, size, dtype)
    _, _, _, _, _, vocab, batch, seq = SIZES[size]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(1))

    step_s = time_steps(make_step(forward, optimizer, ids), steps)
    peak = peak_rss_bytes()
    return {"tokens_per_s": batch * seq / step_s, "step_s": step_s,
            "trainable_params": sum(p.numel() for p in trainable),
            "params": sum(p.numel() for p in model.parameters()),
            "peak_rss_bytes": peak, "training_rss_bytes": peak - rss_before}


def variants(quick: bool) -> dict[str, list[str]]:
    impls = IMPLS
    if importlib.util.find_spec("peft") is None:
        print("(lora: peft is not installed; the peft rows are left out: pip install -e '.[test]')", file=sys.stderr)
        impls = tuple(i for i in IMPLS if i != "peft")
    size = ["--quick"] if quick else []
    return {f"{impl}-{dtype}": ["--impl", impl, "--dtype", dtype, *size]
            for dtype in dtypes(quick, "lora") for impl in impls}


PAIRS = [(f"alloy-lora-{d}", f"{other}-{d}", key)
         for d in ("fp32", "bf16") for other in ("peft", "alloy-full")
         for key in ("tokens_per_s", "training_rss_bytes")] + [
    (f"alloy-qlora-{d}", f"alloy-lora-{d}", key) for d in ("fp32", "bf16") for key in ("tokens_per_s", "training_rss_bytes")]


def headline(summary: dict, machine_flops: dict[str, float]) -> dict:
    out = {}
    figures, ratios = summary["figures"], summary["ratios"]
    for dtype in ("fp32", "bf16"):
        for impl in IMPLS:
            if f"{impl}-{dtype}" in figures:
                out[f"{impl.replace('-', '_')}_tokens_per_s_{dtype}"] = figures[f"{impl}-{dtype}"]["tokens_per_s"]["median"]
        for mine, other, name in (("alloy-lora", "peft", "vs_peft"), ("alloy-lora", "alloy-full", "vs_full"),
                                  ("alloy-qlora", "alloy-lora", "qlora_vs_lora")):
            for key, figure in (("tokens_per_s", "ratio"), ("training_rss_bytes", "rss_ratio")):
                pair = f"{mine}-{dtype}/{other}-{dtype}:{key}"
                if pair in ratios:
                    out[f"{figure}_{name}_{dtype}"] = ratios[pair]["median"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=IMPLS, required=True)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(measure(args.impl, "quick" if args.quick else "full", args.dtype, args.steps)))


if __name__ == "__main__":
    main()
