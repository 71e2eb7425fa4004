"""Quality cost of the decode precisions: held-out perplexity at fp32, bf16 and int8 weights.

There are no trained weights on this machine, and random weights have no perplexity worth the
name, so this trains a small byte-level Llama-spec model first (TinyShakespeare from
../shared/data, else Python's standard library sources), then scores the held-out last 10% of
the text with the same weights prepared each way `alloy generate --dtype` prepares them:
weight-only bf16 and int8 (fp32 arithmetic, Alloy's CPU path), and for comparison the whole
model in bf16 (bf16 activations too: what transformers' bf16 computes) and int8 weights with
bf16 activations (the GPU / no-kernel path). Deterministic: one run, no baseline process.
Run one measurement: python -m bench.quality [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SIZES = {  # (hidden, layers, heads, ffn, steps, batch, seq)
    "quick": (64, 2, 4, 172, 30, 8, 64),
    "full": (256, 4, 8, 688, 300, 16, 128),
}
TINYSHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def corpus() -> tuple[str, bytes]:
    if TINYSHAKESPEARE.is_file():
        return "tinyshakespeare", TINYSHAKESPEARE.read_bytes()
    from alloy.train.data import stdlib_files

    return "python-stdlib", b"\n".join(p.read_bytes() for p in stdlib_files()[:400])


def train(size: str, data: torch.Tensor, seed: int = 0):
    import transformers

    import alloy

    h, layers, heads, ffn, steps, batch, seq = SIZES[size]
    config = transformers.LlamaConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=heads, intermediate_size=ffn, vocab_size=256,
                                      max_position_embeddings=2 * seq, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = alloy.Transformer(alloy.ModelSpec.from_hf_config(config.to_dict())).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        chunk = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        loss = F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1), chunk[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.inference_mode()
def perplexity(model, data: torch.Tensor, seq: int, windows: int) -> float:
    stride = (len(data) - seq - 1) // windows
    ids = torch.stack([data[i * stride:i * stride + seq + 1] for i in range(windows)])
    total = 0.0
    for rows in ids.split(8):
        logits = model(rows[:, :-1]).float()
        total += F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum").item()
    return math.exp(total / (windows * seq))


def measure(size: str) -> dict:
    from alloy.infer.optimize import prepare
    from alloy.infer.quantize import quantize_int8

    torch.set_num_threads(2)
    name, text = corpus()
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    cut = int(0.9 * len(data))
    started = time.perf_counter()
    model = train(size, data[:cut])
    train_s = time.perf_counter() - started
    seq, windows = SIZES[size][-1], 16 if size == "quick" else 64
    held_out = data[cut:]
    ppl = {
        "fp32": perplexity(model, held_out, seq, windows),
        "bf16_weights": perplexity(prepare(copy.deepcopy(model), "bf16"), held_out, seq, windows),
        "int8_weights": perplexity(prepare(copy.deepcopy(model), "int8"), held_out, seq, windows),
        "bf16_all": perplexity(copy.deepcopy(model).to(torch.bfloat16), held_out, seq, windows),
        "int8_bf16_activations": perplexity(quantize_int8(copy.deepcopy(model).to(torch.bfloat16)), held_out, seq,
                                            windows),
    }
    out = {f"ppl_{k}": v for k, v in ppl.items()}
    out.update({f"ppl_delta_pct_{k}": 100 * (v / ppl["fp32"] - 1) for k, v in ppl.items() if k != "fp32"})
    out.update({"train_s": train_s, "held_out_tokens": float(windows * seq), "corpus": name})
    return out


def variants(quick: bool) -> dict[str, list[str]]:
    return {"alloy": ["--quick"] if quick else []}


PAIRS: list[tuple[str, str, str]] = []
ROUNDS = 1  # deterministic (seeded training, no timing): one run says it all


def headline(summary: dict, machine_flops: dict[str, float]) -> dict:
    return {k: v["median"] for k, v in summary["figures"]["alloy"].items() if k.startswith("ppl")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(measure("quick" if args.quick else "full")))


if __name__ == "__main__":
    main()
