"""Decode tokens/s on one device: Alloy's generate vs. transformers' generate, and the HBM roofline.

The ~1B Llama in bf16, greedy, a 16-token prompt and 128 new tokens, batch 1 and 8; rounds
alternate A B A B on the same two loaded models. The roofline time of a token is the weight bytes
a decode step reads (bench.decode.weight_bytes_per_token) over the memory bandwidth: the measured
device-to-device copy rate and the H200's 4.8 TB/s datasheet figure; the fraction is that time
over the measured time per step (1.0 = every weight streamed once per step at that rate).
`--alloy-dtype q4_0` (or q8_0, q4_k) runs Alloy's side in that GGUF block format (its blocks held on
the GPU and decoded there by PyTorch, alloy.quant.linear) against transformers in --dtype: what a
user weighing a 4-bit model against the bf16 one would compare; the weight bytes are each side's.
Run: python -m bench.gpu.decode --device cuda [--rounds 3] [--alloy-dtype q4_0] [--out decode.json]
"""

from __future__ import annotations

import sys
import time

import torch

from bench.decode import weight_bytes_per_token
from bench.gpu import common
from bench.gpu.machine import copy_bytes_per_s

IMPLS = ("alloy", "transformers")
BATCHES = (1, 8)
PROMPT_TOKENS = 16
COPY_BYTES = {"1b": 2 << 30, "tiny": 64 << 20}  # far beyond the 60 MB L2 on the GPU


def build(impl: str, config, device: torch.device, dtype_name: str):
    """(model, run(ids, new_tokens)) with the model loaded on `device`, ready to decode."""
    torch.manual_seed(0)
    with torch.device(device):
        if impl == "transformers":
            import transformers

            model = transformers.LlamaForCausalLM(config).to(common.DTYPES[dtype_name]).eval()

            def run(ids, new):
                return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
            return model, run
        import alloy
        from alloy.infer import generate
        from alloy.infer.optimize import prepare

        model = prepare(alloy.Transformer(common.alloy_spec(config)), dtype_name)

    def run(ids, new):
        return generate(model, ids.tolist(), max_new_tokens=new, eos_ids=())
    return model, run


def measure(run, device, vocab: int, batch: int, new: int) -> dict:
    ids = torch.randint(1, vocab, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        run(ids, 4)  # warm-up: allocator, kernel choice
        common.sync(device)
        started = time.perf_counter()
        run(ids, new)
        common.sync(device)
        elapsed_s = time.perf_counter() - started
    # One step produces a token for every row; the prefill is amortised over the steps.
    return {"batch": batch, "new_tokens": new, "elapsed_s": elapsed_s, "step_s": elapsed_s / new,
            "tokens_per_s": batch * new / elapsed_s}


def main(argv=None) -> int:
    p = common.parser(__doc__, "A B rounds per batch size (default 3; tiny 1)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per request (default 128)")
    p.add_argument("--alloy-dtype", choices=["q8_0", "q4_0", "q4_k"], default=None,
                   help="Alloy's weights in this GGUF block format instead of --dtype (transformers stays in --dtype)")
    args = p.parse_args(argv)
    device = common.check_args(p, args)
    size = "tiny" if args.tiny else "1b"
    rounds, new = args.rounds or (1 if args.tiny else 3), args.new_tokens or (8 if args.tiny else 128)
    config = common.llama_config(size)
    record = common.Record("decode", args, size=size, config=common.SIZES[size], dtype=args.dtype,
                           alloy_dtype=args.alloy_dtype or args.dtype, prompt_tokens=PROMPT_TOKENS, new_tokens=new,
                           rounds=rounds,
                           datasheet_bytes_per_s=common.H200_HBM_BYTES_PER_S)
    record.doc["gpu"] = common.gpu_name(device)
    bandwidth = copy_bytes_per_s(device, COPY_BYTES[size])
    record.doc["measured_copy_bytes_per_s"] = bandwidth
    common.free(device)
    runners, weight_bytes = {}, {}
    for impl in IMPLS:
        try:
            dtype = (args.alloy_dtype or args.dtype) if impl == "alloy" else args.dtype
            model, runners[impl] = build(impl, config, device, dtype)
            weight_bytes[impl] = weight_bytes_per_token(model)
        except Exception as err:
            record.error(f"build {impl}", err)
    record.doc["weight_bytes_per_token"] = weight_bytes
    for batch in BATCHES:
        for r in record.rounds(rounds, f" of batch {batch}"):
            for impl, run in runners.items():
                try:
                    sample = measure(run, device, config.vocab_size, batch, new)
                except Exception as err:
                    record.error(f"batch {batch} round {r} {impl}", err)
                    continue
                roofline_s = weight_bytes[impl] / bandwidth
                sample.update(impl=impl, round=r, roofline_fraction_measured=roofline_s / sample["step_s"],
                              roofline_fraction_datasheet=weight_bytes[impl] / common.H200_HBM_BYTES_PER_S
                              / sample["step_s"])
                record.add(sample)
    return record.finish(summary=summarize(record.doc["samples"]))


def summarize(samples: list[dict]) -> dict:
    out = {}
    for batch in BATCHES:
        rows = [s for s in samples if s["batch"] == batch]
        by = {impl: {s["round"]: s for s in rows if s["impl"] == impl} for impl in IMPLS}
        for impl in IMPLS:
            out[f"{impl}_b{batch}"] = {k: common.stats([s[k] for s in by[impl].values()])
                                       for k in ("tokens_per_s", "roofline_fraction_measured",
                                                 "roofline_fraction_datasheet")}
        both = sorted(set(by["alloy"]) & set(by["transformers"]))
        out[f"ratio_tokens_per_s_b{batch}"] = common.pairwise_ratios(
            [by["alloy"][r]["tokens_per_s"] for r in both], [by["transformers"][r]["tokens_per_s"] for r in both])
    return out


if __name__ == "__main__":
    sys.exit(main())
