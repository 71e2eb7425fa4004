"""Quality cost of the decode precisions: held-out perplexity at fp32, bf16, int8 and the GGUF
block formats (q8_0, q4_0, q4_1, q4_k), the block formats next to llama.cpp's on the same weights.

There are no trained weights on this machine, and random weights have no perplexity worth the
name, so this trains a small byte-level Llama-spec model first (TinyShakespeare from
../shared/data, else Python's standard library sources), then scores held-out text (after the
first 90%) with the same weights prepared each way `alloy generate --dtype` prepares them:
bf16 (weights and each matmul's input in bf16, fp32 products and sums, everything between the
matmuls fp32: Alloy's CPU path), weight-only int8 (fp32 arithmetic), the GGUF block formats (head
and token table in q8_0), and for comparison the whole model in bf16 (every activation too: what
transformers' bf16 computes) and int8 weights with bf16 activations (the GPU / no-kernel path).

The held-out text is cut into consecutive chunks of `seq` tokens, laid out as llama.cpp's
`llama-perplexity -c seq` cuts a file; `ppl_<row>` scores every position of each chunk,
`ppl_half_*` only the second half (positions seq/2 + 1 .. seq - 1), which is what llama-perplexity
scores. The baselines for the block formats, on the same weights:
- llama.cpp (`ppl_half_llamacpp_*`): the model exported to GGUF F32 (alloy.fuse.gguf, with a
  byte-level vocabulary: token id = byte, as trained), quantized by llama.cpp's own
  `llama-quantize --pure` (head and token table in Q8_0, as Alloy keeps them) and scored by
  `llama-perplexity` (defaults, -t 2) on the held-out chunks written to a file. The tokens it
  read are checked against Alloy's. $LLAMA_PERPLEXITY / $LLAMA_QUANTIZE, else beside
  $LLAMA_BENCH or on PATH (bench.decode.llama_binary); left out where absent.
- gguf-py (`ppl_half_ggufpy_*`, always): the same GGUF tensors (llama-quantize's output, or
  without it the F32 file quantized by `gguf.quants.quantize`, which has no Q4_K) decoded by
  `gguf.quants.dequantize` (numpy references of ggml's formats) into the model in fp32 and scored
  by the code that scores Alloy: an independent decode of the same bytes.
Deterministic: one run, one process (llama.cpp's tools as subprocesses; a crash is reported).
Run one measurement: python -m bench.quality [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SIZES = {  # (hidden, layers, heads, ffn, steps, batch, seq); widths multiples of 256: Q4_K's block
    "quick": (256, 2, 4, 512, 30, 8, 64),
    "full": (256, 4, 8, 768, 300, 16, 128),
}
CHUNKS = {"quick": 16, "full": 64}  # held-out chunks of `seq` tokens
BLOCK_FORMATS = ("q8_0", "q4_0", "q4_1", "q4_k")  # Alloy's names (alloy.infer.optimize.QUANT_FORMATS)
GGML_TYPES = {"fp32": "F32", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q4_k": "Q4_K"}
HEAD_TYPE = "Q8_0"  # output and token table under every block format (alloy.quant.HEAD_FORMAT)
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
def token_nll(model, chunks: torch.Tensor) -> torch.Tensor:
    """chunks [n, seq] -> [n, seq - 1]: column j is -log p(chunk[j + 1] | chunk[:j + 1]). Scored
    through the model's own KV cache, as decoding reads it: attention over the keys and values as
    the cache holds them (bf16 where prepare chose a bf16 cache)."""
    out = []
    for rows in chunks.split(8):
        cache = model.new_cache(rows.shape[0], rows.shape[1] - 1)
        logits = model(rows[:, :-1], cache=cache).float()  # [8, seq - 1, vocab]
        out.append(F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none"))
    return torch.cat(out)


def perplexity(nll: torch.Tensor, first: int = 0) -> float:
    """exp(mean nll) over the predictions made at positions `first` and later of every chunk."""
    return math.exp(nll[:, first:].double().mean().item())


# ---- the same weights as GGUF: llama.cpp's tools and gguf-py's reference decode ----------------

def byte_tokenizer():
    """Token id = byte value, as the model was trained, as a byte-level BPE: the byte symbols and
    one merge. llama.cpp refuses a BPE vocabulary without merges (and gguf-py's writer drops an
    empty list), so id 0 -- NUL, which no text here holds -- is spelt as the merge of bytes 1 and 2,
    which no text here holds side by side either: every byte of the text stays its own token
    (llama_perplexity checks the tokens llama.cpp read)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from bench.serve import bytes_to_unicode

    symbol = bytes_to_unicode()
    vocab = {symbol[b]: b for b in range(1, 256)} | {symbol[1] + symbol[2]: 0}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(symbol[1], symbol[2])]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def export_f32(model, root: Path) -> Path:
    """The trained model as an HF directory with the byte vocabulary, then as GGUF F32."""
    import alloy
    from alloy.fuse.gguf import export_gguf

    alloy.save(model, root / "hf", overwrite=True)
    byte_tokenizer().save(str(root / "hf" / "tokenizer.json"))
    return export_gguf(root / "hf", root / "model-f32.gguf")


def llama_tool(name: str, env: str) -> str | None:
    """A llama.cpp tool: $env, else beside $LLAMA_PERPLEXITY, else as bench.decode finds them."""
    from bench.decode import llama_binary

    if os.environ.get(env):
        return os.environ[env]
    if os.environ.get("LLAMA_PERPLEXITY"):
        beside = Path(os.environ["LLAMA_PERPLEXITY"]).with_name(name)
        if beside.is_file():
            return str(beside)
    return llama_binary(name)


def run_tool(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} exited with {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return proc.stdout + proc.stderr


def llama_quantize(binary: str, f32: Path, fmt: str) -> Path:
    """llama.cpp's quantizer, every layer in `fmt` (--pure: no Q4_K_M-style mix), head and token
    table in Q8_0: tensor for tensor the formats Alloy's prepare(model, fmt) holds."""
    out = f32.with_name(f"model-{fmt}.gguf")
    run_tool([binary, "--pure", "--output-tensor-type", HEAD_TYPE.lower(), "--token-embedding-type",
              HEAD_TYPE.lower(), str(f32), str(out), GGML_TYPES[fmt], "2"])
    return out


def gguf_tensors(path: Path, fmt: str | None = None) -> dict[str, tuple[np.ndarray, object]]:
    """GGUF name -> (raw data, ggml type). With `fmt`, the file is F32 and its matrices are
    quantized here by gguf.quants (head and token table in Q8_0, as llama_quantize does)."""
    import gguf

    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        data, kind = np.array(t.data), t.tensor_type
        if fmt is not None and data.ndim == 2:
            head = t.name in ("output.weight", "token_embd.weight")
            kind = gguf.GGMLQuantizationType[HEAD_TYPE if head else GGML_TYPES[fmt]]
            data = gguf.quants.quantize(data, kind)  # NotImplementedError for Q4_K
        out[t.name] = (data, kind)
    return out


@torch.no_grad()
def model_from_gguf(model, tensors: dict[str, tuple[np.ndarray, object]]):
    """A copy of the fp32 `model` with every parameter replaced by the GGUF tensor's gguf.quants decode."""
    import gguf

    from alloy.checkpoint.gguf_names import tensor_names, unpermute

    spec, names = model.spec, tensor_names(model.spec)
    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    assert set(params) == set(names) and set(names.values()) == set(tensors), "every tensor accounted for"
    for ours, theirs in names.items():
        w = torch.from_numpy(gguf.quants.dequantize(*tensors[theirs]).astype(np.float32))
        if ours.endswith("attn.wq.weight"):
            w = unpermute(w, spec.num_heads)
        elif ours.endswith("attn.wk.weight"):
            w = unpermute(w, spec.num_kv_heads)
        assert w.shape == params[ours].shape, (ours, tuple(w.shape))
        params[ours].copy_(w)
    return model


def llama_perplexity(binary: str, gguf_path: Path, text: Path, chunks: torch.Tensor) -> float:
    """llama-perplexity's final estimate on `text`, chunks of seq tokens (-c seq), 2 threads,
    after checking that the tokens it scored are `chunks` (read back from its logits file)."""
    n, seq = chunks.shape
    saved = text.with_name(f"{gguf_path.stem}.logits")
    log = run_tool([binary, "-m", str(gguf_path), "-f", str(text), "-c", str(seq), "--chunks", str(n), "-t", "2",
                    "--kl-divergence-base", str(saved)])
    with open(saved, "rb") as f:  # "_logits_", n_ctx, n_vocab, n_chunk (int32), then the tokens
        magic, header = f.read(8), np.frombuffer(f.read(12), dtype=np.int32)
        tokens = np.frombuffer(f.read(4 * n * seq), dtype=np.int32)
    saved.unlink()
    if magic != b"_logits_" or header[0] != seq or header[2] != n or not np.array_equal(tokens, chunks.flatten()):
        raise RuntimeError(f"llama-perplexity read other tokens than Alloy's (header {header.tolist()}): "
                           "the GGUF's byte vocabulary or its BOS handling differs")
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    if found:
        return float(found.group(1))
    # Its running estimate after the last chunk is the final one. The "Final estimate" line was
    # missing from one of ten runs on machine C that exited cleanly (llama.cpp logs from a thread).
    running = re.findall(rf"\[{n}\]([0-9.]+)", log)
    if running:
        return float(running[-1])
    raise RuntimeError(f"no final estimate in llama-perplexity's output: {log.strip()[-300:]}")


def baselines(model, chunks: torch.Tensor, text: bytes, root: Path) -> dict:
    """ppl_half_ggufpy_<fmt> and, where llama.cpp's tools run, ppl_half_llamacpp_<fmt>, for fp32
    and every block format; `baseline` names what was used, `left_out` why any row is missing."""
    first = chunks.shape[1] // 2
    f32 = export_f32(model, root)
    held_out = root / "held-out.txt"
    held_out.write_bytes(text)
    quantizer = llama_tool("llama-quantize", "LLAMA_QUANTIZE")
    scorer = llama_tool("llama-perplexity", "LLAMA_PERPLEXITY")
    files, out, left_out = {"fp32": f32}, {}, []
    for fmt in BLOCK_FORMATS if quantizer else ():
        try:
            files[fmt] = llama_quantize(quantizer, f32, fmt)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            left_out.append(f"llama-quantize {fmt}: {err}")
    for fmt in ("fp32", *BLOCK_FORMATS):
        try:
            tensors = gguf_tensors(*((files[fmt],) if fmt in files else (f32, fmt)))
        except NotImplementedError:
            left_out.append(f"gguf-py {fmt}: gguf.quants has no {GGML_TYPES[fmt]} quantizer (set LLAMA_QUANTIZE)")
            continue
        out[f"ppl_half_ggufpy_{fmt}"] = perplexity(token_nll(model_from_gguf(model, tensors), chunks), first)
    for fmt in files if scorer else ():
        try:
            out[f"ppl_half_llamacpp_{fmt}"] = llama_perplexity(scorer, files[fmt], held_out, chunks)
        except (RuntimeError, subprocess.TimeoutExpired) as err:  # a build that crashes here is reported
            left_out.append(f"llama-perplexity {fmt}: {' '.join(str(err).split())[:300]}")
    if not scorer:
        left_out.append("llama.cpp: no llama-perplexity ($LLAMA_PERPLEXITY, beside $LLAMA_BENCH or on PATH)")
    quantized_by = "llama-quantize" if quantizer else "gguf.quants.quantize"
    out["baseline"] = ((f"llama-perplexity ({scorer}) and " if scorer else "") +
                       f"gguf-py (gguf.quants.dequantize) on {quantized_by}'s blocks")
    out["left_out"] = left_out
    return out


def measure(size: str) -> dict:
    from alloy.infer.optimize import prepare
    from alloy.infer.quantize import quantize_int8

    torch.set_num_threads(2)
    name, text = corpus()
    cut = int(0.9 * len(text))
    while text[cut] & 0xC0 == 0x80:  # start the held-out text on a whole UTF-8 character
        cut += 1
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    started = time.perf_counter()
    model = train(size, data[:cut])
    train_s = time.perf_counter() - started
    seq, n = SIZES[size][-1], CHUNKS[size]
    chunks = data[cut:cut + n * seq].view(n, seq)
    variants = {
        "fp32": lambda m: m,
        "bf16_operands": lambda m: prepare(m, "bf16"),
        "int8_weights": lambda m: prepare(m, "int8"),
        "bf16_all": lambda m: m.to(torch.bfloat16),
        "int8_bf16_activations": lambda m: quantize_int8(m.to(torch.bfloat16)),
        **{fmt: (lambda m, fmt=fmt: prepare(m, fmt)) for fmt in BLOCK_FORMATS},
    }
    nll = {row: token_nll(convert(copy.deepcopy(model)), chunks) for row, convert in variants.items()}
    out = {f"ppl_{row}": perplexity(v) for row, v in nll.items()}
    out.update({f"ppl_delta_pct_{row}": 100 * (out[f"ppl_{row}"] / out["ppl_fp32"] - 1)
                for row in nll if row != "fp32"})
    first = seq // 2  # llama-perplexity's scored positions: the second half of each chunk
    out.update({f"ppl_half_alloy_{row}": perplexity(nll[row], first) for row in ("fp32", *BLOCK_FORMATS)})
    root = Path(tempfile.mkdtemp(prefix="alloy-bench-quality-"))
    try:  # 3 bytes past the last chunk: a UTF-8 character it cuts stays whole (the tail is no chunk)
        out.update(baselines(model, chunks, text[cut:cut + n * seq + 3], root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for impl in ("llamacpp", "ggufpy"):
        for row in ("fp32", *BLOCK_FORMATS):
            if f"ppl_half_{impl}_{row}" in out:
                out[f"ratio_alloy_{row}_vs_{impl}_{row}"] = out[f"ppl_half_alloy_{row}"] / out[f"ppl_half_{impl}_{row}"]
    out.update({"train_s": train_s, "held_out_tokens": float(chunks.numel()), "chunk_tokens": float(seq),
                "corpus": name})
    for why in out["left_out"]:
        print(f"  (quality: left out: {why})", file=sys.stderr)
    return out


def variants(quick: bool) -> dict[str, list[str]]:
    return {"alloy": ["--quick"] if quick else []}


PAIRS: list[tuple[str, str, str]] = []
ROUNDS = 1  # deterministic (seeded training, no timing): one run says it all


def headline(summary: dict, machine_flops: dict[str, float]) -> dict:
    return {k: v["median"] for k, v in summary["figures"]["alloy"].items() if k.startswith(("ppl", "ratio"))}


def report(samples: dict) -> str:
    """The block formats side by side: Alloy's perplexity on llama-perplexity's positions against
    each baseline's, and the ratio (the issue's bound: Q4_0 within 0.5 % of llama.cpp's)."""
    r = samples["alloy"][0]
    lines = [f"baseline: {r['baseline']}", "",
             "| format | Alloy, all positions | Alloy, 2nd halves | gguf-py | Alloy / gguf-py | llama.cpp | "
             "Alloy / llama.cpp |", "| --- | --- | --- | --- | --- | --- | --- |"]

    def cell(key: str, digits: str = ".4f") -> str:
        return format(r[key], digits) if key in r else "—"
    for row in ("fp32", *BLOCK_FORMATS):
        lines.append(f"| {row} | {cell(f'ppl_{row}')} | {cell(f'ppl_half_alloy_{row}')} | "
                     f"{cell(f'ppl_half_ggufpy_{row}')} | {cell(f'ratio_alloy_{row}_vs_ggufpy_{row}', '.5f')} | "
                     f"{cell(f'ppl_half_llamacpp_{row}')} | {cell(f'ratio_alloy_{row}_vs_llamacpp_{row}', '.5f')} |")
    return "\n".join(lines + [f"left out: {why}" for why in r["left_out"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(measure("quick" if args.quick else "full")))


if __name__ == "__main__":
    main()
