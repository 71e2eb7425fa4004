"""Decode tokens/s: Alloy's generate vs. transformers' generate, fp32 / bf16 / int8 / GGUF blocks, batch 1 and 8.

Same Llama spec (built through LlamaConfig, untied head: the issue's ~98M reference is h768,
12 layers, ff 2048, vocab 8192), same 16-token prompt, greedy, 128 new tokens, 2 threads.
The roofline fraction is (weight bytes read per token / the memory bandwidth measured in the same
process just before) / measured time per token: 1.0 would be streaming every weight once per token
at that rate (a vectorised streaming read of 256 MiB on the 2 threads; on a shared VM the rate
drifts by tens of percent within an hour, so a cached profile's figure would misstate the fraction).
Alloy's bf16 and int8 are weight-only (fp32 arithmetic on CPU); transformers' bf16 is the whole
model in bf16. Alloy's q8_0 / q4_0 / q4_k keep the weights as GGUF blocks (head in q8_0) and
run int8-activation dot products on them (alloy.quant). llama.cpp's own tools, llama-bench and
llama-quantize (found beside $LLAMA_BENCH or on PATH; left out where absent), run the same spec and weights from Alloy's own GGUF export,
quantized by llama.cpp's own quantizer (Q8_0, Q4_0, Q4_K_M), with 2 threads: each dtype against its
llama.cpp counterpart at batch 1, at batch 8 (llama-batched-bench, where built) and for a 512-token
prompt (`-pp512` rows: prefill tokens/s, llama-bench's pp512). Every variant is its own process (a
crash is a crash).
Run one measurement: python -m bench.decode --impl alloy --dtype int8 [--batch 8] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {  # (hidden, layers, heads, ffn, vocab, new_tokens)
    "quick": (256, 4, 4, 768, 2048, 32),  # FFN a multiple of 256: every GGUF block format takes it
    "full": (768, 12, 12, 2048, 8192, 128),
}
PROMPT_TOKENS = 16
PREFILL_TOKENS = 512  # the prompt of the prefill rows (llama-bench's pp512)
QUANT_ROWS = ("q8_0", "q4_0", "q4_k")  # GGUF block formats measured (q4_1 runs too: --dtype q4_1)


def hf_config(size: str):
    import transformers

    h, layers, heads, ffn, vocab, _ = SIZES[size]
    return transformers.LlamaConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=heads, intermediate_size=ffn, vocab_size=vocab,
                                    max_position_embeddings=1024, tie_word_embeddings=False)


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of every weight a decode step reads: all but the embedding table (one row of it)."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "embed" in name and t.dim() == 2:
            total += t[0].numel() * t.element_size()
        elif "inv_freq" not in name and "rotary" not in name:
            total += t.numel() * t.element_size()
    return total


MAY_CRASH = ("llamacpp-",)  # a llama.cpp build that crashes on this CPU is reported, not fatal
LLAMA_FTYPES = {"fp32": None, "bf16": None, "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q4_K_M"}


def llama_binary(name: str) -> str | None:
    """A llama.cpp tool: $LLAMA_BENCH's folder (or $LLAMA_SERVER's), else PATH. A native build
    (GGML_NATIVE=ON, what a user gets) crashed on the AMX Xeon of docs/BENCHMARKS.md (SIGILL /
    SIGSEGV on quantized models: build with GGML_NATIVE=OFF there) and ran on the Zen 4."""
    for env in ("LLAMA_BENCH", "LLAMA_SERVER"):
        if os.environ.get(env):
            candidate = Path(os.environ[env]).with_name(name)
            if candidate.is_file():
                return str(candidate)
    return shutil.which(name)


def required_llama_binary(name: str) -> str:
    found = llama_binary(name)
    if found is None:
        raise RuntimeError(f"{name} is not beside $LLAMA_BENCH nor on PATH: build that llama.cpp target")
    return found


def alloy_model(size: str):
    import alloy

    torch.manual_seed(0)
    return alloy.Transformer(alloy.ModelSpec.from_hf_config(hf_config(size).to_dict()))


def llama_gguf(size: str, dtype_name: str) -> Path:
    """The bench model as a GGUF file for llama.cpp: Alloy's export (F32 or BF16), quantized by
    llama.cpp's own quantizer for the block formats; cached in the temporary directory."""
    import alloy

    root = Path(tempfile.gettempdir()) / f"alloy-bench-decode-{size}-v1"
    base = root / ("model-bf16.gguf" if dtype_name == "bf16" else "model-f32.gguf")
    if not base.is_file():
        from bench.serve import byte_bpe

        alloy.save(alloy_model(size), root / "hf", overwrite=True)
        byte_bpe(hf_config(size).vocab_size)[0].save(str(root / "hf" / "tokenizer.json"))  # llama.cpp needs a vocabulary
        subprocess.run([sys.executable, "-m", "alloy", "export", str(root / "hf"), "--format", "gguf", "--out",
                        str(base), "--force"] + (["--dtype", "bf16"] if dtype_name == "bf16" else []),
                       check=True, stdout=subprocess.DEVNULL)
    if LLAMA_FTYPES[dtype_name] is None:
        return base
    out = root / f"model-{dtype_name}.gguf"
    if not out.is_file():
        staging = out.with_name(out.name + f".{os.getpid()}")
        subprocess.run([required_llama_binary("llama-quantize"), str(base), str(staging), LLAMA_FTYPES[dtype_name], "2"],
                       check=True, capture_output=True)
        staging.replace(out)
    return out


def measure_llama_cpp(size: str, dtype_name: str, new: int, prompt: int = PROMPT_TOKENS, batch: int = 1) -> dict:
    """llama-bench on the same weights, 2 threads: the prompt (16 tokens) then `new` tokens, its
    time the sum of both, as Alloy's figure includes its prefill. `new` 0: the prompt alone
    (prefill tokens/s). `batch` > 1: that many sequences at once (llama-batched-bench)."""
    model = llama_gguf(size, dtype_name)
    if batch > 1:  # llama-batched-bench: `batch` sequences decoding together, the time of prompt + tokens
        argv = [required_llama_binary("llama-batched-bench"), "-m", str(model), "-c", "2048", "-b", "2048", "-ub", "512",
                "-npp", str(prompt), "-ntg", str(new), "-npl", str(batch), "-t", "2", "--output-format", "jsonl"]
        for _ in range(4):  # its log thread sometimes loses the result row at exit (an empty stdout, status 0)
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"llama-batched-bench exited with {proc.returncode}: {proc.stderr.strip()[-300:]}")
            found = re.search(r'\{"n_kv_max".*?\}', proc.stdout + proc.stderr)
            if found is not None:
                row = json.loads(found.group(0))
                return {"tokens_per_s": batch * new / row["t"], "decode_only_tokens_per_s": row["speed_tg"]}
        raise RuntimeError("llama-batched-bench printed no result row in 4 runs")
    if new == 0:
        proc = subprocess.run([required_llama_binary("llama-bench"), "-m", str(model), "-p", str(prompt), "-n", "0",
                               "-t", "2", "-r", "1", "-o", "json"], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"llama-bench exited with {proc.returncode}: {proc.stderr.strip()[-300:]}")
        return {"tokens_per_s": json.loads(proc.stdout)[0]["avg_ts"]}
    proc = subprocess.run([required_llama_binary("llama-bench"), "-m", str(model), "-p", str(PROMPT_TOKENS), "-n", str(new),
                           "-t", "2", "-r", "1", "-o", "json"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench exited with {proc.returncode}: {proc.stderr.strip()[-300:]}")
    rows = {("pp" if r["n_gen"] == 0 else "tg"): r for r in json.loads(proc.stdout)}
    elapsed = PROMPT_TOKENS / rows["pp"]["avg_ts"] + new / rows["tg"]["avg_ts"]
    return {"tokens_per_s": new / elapsed, "step_s": elapsed / new, "decode_only_tokens_per_s": rows["tg"]["avg_ts"],
            "weight_bytes": float(model.stat().st_size)}


def build(impl: str, size: str, dtype_name: str):
    torch.manual_seed(0)
    config = hf_config(size)
    if impl == "transformers":
        import transformers

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        model = transformers.LlamaForCausalLM(config).to(dtype).eval()

        def run(ids, new):
            return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                                  min_new_tokens=new, pad_token_id=0)
        return model, run
    from alloy.infer import generate
    from alloy.infer.optimize import prepare

    model = prepare(alloy_model(size), dtype_name)

    def run(ids, new):
        return generate(model, ids.tolist(), max_new_tokens=new, eos_ids=())
    return model, run


def measure(impl: str, size: str, dtype_name: str, batch: int, bandwidth: float | None, prefill: int = 0) -> dict:
    """Decode tokens/s (16-token prompt + the size's new tokens), or with `prefill`, the prompt's
    tokens/s: that many tokens in, one out."""
    if impl == "llamacpp":
        if prefill:
            return measure_llama_cpp(size, dtype_name, 0, prefill)
        if batch > 1:
            return measure_llama_cpp(size, dtype_name, SIZES[size][-1], batch=batch)
        out = measure_llama_cpp(size, dtype_name, SIZES[size][-1])
        if bandwidth:  # the file's bytes: every weight once per token, the embedding table too (an overestimate)
            out["roofline_fraction"] = out["weight_bytes"] / bandwidth / out["step_s"]
        return out
    torch.set_num_threads(2)
    model, run = build(impl, size, dtype_name)
    new = SIZES[size][-1]
    ids = torch.randint(1, SIZES[size][4], (batch, prefill or PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    if prefill:
        with torch.inference_mode():
            run(ids, 1)  # warm-up
            started = time.perf_counter()
            run(ids, 1)
            return {"tokens_per_s": batch * prefill / (time.perf_counter() - started)}
    with torch.inference_mode():
        run(ids, 4)  # warm-up: allocator, kernels
        started = time.perf_counter()
        run(ids, new)
        elapsed = time.perf_counter() - started
    token_s = elapsed / new  # one step for the whole batch (prefill included, amortised)
    out = {"tokens_per_s": batch * new / elapsed, "step_s": token_s,
           "weight_bytes": float(weight_bytes_per_token(model))}
    if bandwidth:
        out["roofline_fraction"] = out["weight_bytes"] / bandwidth / token_s
    return out


def memory_bandwidth() -> float | None:
    """The streaming read rate now, on the benchmark's 2 threads (alloy.devices.measure's probe)."""
    try:
        from alloy.devices.measure import memory_bandwidth_bytes_per_s

        torch.set_num_threads(2)
        return memory_bandwidth_bytes_per_s(torch.device("cpu"), 256 << 20, 0.5)
    except Exception:  # the figure is left out, the benchmark still runs
        return None


def variants(quick: bool) -> dict[str, list[str]]:
    size = ["--quick"] if quick else []
    runs = {f"{impl}-{dtype}": ["--impl", impl, "--dtype", dtype, *size]
            for dtype in ("fp32", "bf16") for impl in ("alloy", "transformers")}
    runs["alloy-int8"] = ["--impl", "alloy", "--dtype", "int8", *size]
    for dtype in QUANT_ROWS:
        runs[f"alloy-{dtype}"] = ["--impl", "alloy", "--dtype", dtype, *size]
    for dtype in ("fp32", "bf16"):
        for impl in ("alloy", "transformers"):
            runs[f"{impl}-{dtype}-b8"] = ["--impl", impl, "--dtype", dtype, "--batch", "8", *size]
    for dtype in QUANT_ROWS:
        runs[f"alloy-{dtype}-b8"] = ["--impl", "alloy", "--dtype", dtype, "--batch", "8", *size]
    if not (llama_binary("llama-bench") and llama_binary("llama-quantize")):
        print("  (decode: llama.cpp baseline left out: no llama-bench / llama-quantize on PATH or beside "
              "$LLAMA_BENCH; build llama.cpp, GGML_NATIVE=OFF on a VM)", file=sys.stderr)
    else:
        for dtype in LLAMA_FTYPES:
            runs[f"llamacpp-{dtype}"] = ["--impl", "llamacpp", "--dtype", dtype, *size]
    if "llamacpp-fp32" in runs and llama_binary("llama-batched-bench"):  # 8 sequences at once
        for dtype in LLAMA_FTYPES:
            runs[f"llamacpp-{dtype}-b8"] = ["--impl", "llamacpp", "--dtype", dtype, "--batch", "8", *size]
    for dtype in LLAMA_FTYPES:  # prefill: 512 tokens in (llama.cpp's pp512), against llama.cpp where it is here
        impls = ("alloy", "llamacpp") if "llamacpp-fp32" in runs else ("alloy",)
        for impl in impls:
            runs[f"{impl}-{dtype}-pp{PREFILL_TOKENS}"] = ["--impl", impl, "--dtype", dtype, "--prefill",
                                                          str(PREFILL_TOKENS), *size]
    return runs


PAIRS = [("alloy-fp32", "transformers-fp32", "tokens_per_s"), ("alloy-bf16", "transformers-bf16", "tokens_per_s"),
         ("alloy-int8", "transformers-bf16", "tokens_per_s"), ("alloy-int8", "transformers-fp32", "tokens_per_s"),
         ("alloy-fp32-b8", "transformers-fp32-b8", "tokens_per_s"),
         ("alloy-bf16-b8", "transformers-bf16-b8", "tokens_per_s"),
         ("alloy-q8_0", "alloy-fp32", "tokens_per_s"), ("alloy-q8_0", "alloy-int8", "tokens_per_s"),
         ("alloy-q4_0", "alloy-fp32", "tokens_per_s"), ("alloy-q4_k", "alloy-fp32", "tokens_per_s"),
         ("alloy-q8_0-b8", "alloy-fp32-b8", "tokens_per_s")] + [
         (f"alloy-{d}", f"llamacpp-{d}", "tokens_per_s") for d in LLAMA_FTYPES] + [
         (f"alloy-{d}-pp{PREFILL_TOKENS}", f"llamacpp-{d}-pp{PREFILL_TOKENS}", "tokens_per_s") for d in LLAMA_FTYPES] + [
         (f"alloy-{d}-b8", f"llamacpp-{d}-b8", "tokens_per_s") for d in LLAMA_FTYPES]


def headline(summary: dict, machine_flops: dict[str, float]) -> dict:
    figures, ratios = summary["figures"], summary["ratios"]
    out = {f"{name.replace('-', '_')}_tokens_per_s": f["tokens_per_s"]["median"] for name, f in figures.items()}
    for a, b, key in PAIRS:
        if f"{a}/{b}:{key}" in ratios:  # a baseline this machine leaves out has no ratio
            out[f"ratio_{a.replace('-', '_')}_vs_{b.replace('-', '_')}"] = ratios[f"{a}/{b}:{key}"]["median"]
    for name, f in figures.items():
        if "roofline_fraction" in f:
            out[f"{name.replace('-', '_')}_roofline_fraction"] = f["roofline_fraction"]["median"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["alloy", "transformers", "llamacpp"], required=True)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "int8", "q8_0", "q4_0", "q4_1", "q4_k"], default="fp32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--prefill", type=int, default=0, metavar="TOKENS",
                        help="measure the prompt instead: TOKENS in, one out (prefill tokens/s)")
    args = parser.parse_args()
    if args.impl == "llamacpp" and args.dtype not in LLAMA_FTYPES:
        parser.error(f"the llama.cpp baseline runs {', '.join(LLAMA_FTYPES)}")
    if args.impl == "transformers" and args.dtype not in ("fp32", "bf16"):
        parser.error(f"transformers has no CPU {args.dtype} path here; compare alloy-{args.dtype} with transformers-bf16")
    bandwidth = memory_bandwidth()
    result = measure(args.impl, "quick" if args.quick else "full", args.dtype, args.batch, bandwidth, args.prefill)
    if bandwidth and "roofline_fraction" in result:
        result["bandwidth_bytes_per_s"] = bandwidth
    print(json.dumps(result))


if __name__ == "__main__":
    main()
