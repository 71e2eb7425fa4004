"""Greedy tokens of a Q8_0 model: Alloy against llama.cpp on the same GGUF file (issue 21).

The model is a small Llama whose weights come from an integer hash (bit-identical on every machine,
so a test can hold llama.cpp's answer without llama.cpp): h128, 2 layers, GQA 4/2, FFN 256, vocab
320 with a byte-level BPE vocabulary (llama.cpp needs one); its head favours a fixed successor of
each token (and the layers move the choice), so each step's top token leads by a clear margin:
no near-ties for the two programs' different roundings to flip.

`python -m bench.llama_parity` (needs llama.cpp's llama-quantize and llama-server beside
$LLAMA_BENCH / $LLAMA_SERVER or on PATH):
1. Alloy exports the model as F32 GGUF; llama-quantize makes it Q8_0 (llama.cpp's own quantizer);
2. Alloy also exports Q8_0 itself: are the tensor bytes llama-quantize's? (then it is the same GGUF);
3. llama-server decodes PROMPT greedily for NEW tokens from the Q8_0 file; Alloy loads that file and
   decodes in q8_0 (GGUF blocks, int8 activations) the same way.
It prints the tensor-data SHA-256, both token lists and how many agree; tests/test_llama_parity.py
holds the figures of a run (recorded with the command and machine) and checks Alloy against them.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

PROMPT = [2, 60, 40, 71, 45, 2, 51, 9, 33, 80, 17, 5]  # token ids (byte-level BPE: any ids are text)
NEW = 40
HEAD_GAIN = 16.0  # the head's weights times this: logits of tens, margins of units
LAYER_GAIN = 0.1  # the layers' output projections times this: the token's own embedding stays in the lead


def spec():
    from alloy.spec import ModelSpec

    return ModelSpec(family="llama", vocab_size=320, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=32, intermediate_size=256, max_seq_len=256, tie_embeddings=False,
                     bos_token_id=0, eos_token_id=(1,))


def hashed(shape: tuple[int, ...], salt: int, scale: float) -> torch.Tensor:
    """Weights in [-scale, scale) from an integer hash of (index, salt): the same floats everywhere."""
    n = 1
    for d in shape:
        n *= d
    index = torch.arange(n, dtype=torch.int64)
    mixed = (index * 2654435761 + salt * 40503 + 12345) % (1 << 32)
    mixed = (mixed ^ (mixed >> 13)) * 1274126177 % (1 << 32)
    unit = mixed.double() / float(1 << 32) - 0.5  # exact in float64
    return (unit * (2 * scale)).float().view(shape)  # one rounding to fp32, correctly rounded


def build_model():
    """The parity model: Alloy's Transformer with hashed weights (norms near 1)."""
    from alloy.model import Transformer

    model = Transformer(spec())
    with torch.no_grad():
        for salt, (name, p) in enumerate(sorted(model.named_parameters())):
            if p.dim() == 1:
                p.copy_(1.0 + hashed(tuple(p.shape), salt, 0.25))
            else:
                p.copy_(hashed(tuple(p.shape), salt, 2.0 / p.shape[-1] ** 0.5))
        # The head reads the embedding of a fixed successor (v -> 7v + 3 mod V) and the layers add
        # a smaller, input-dependent part: every step's top token then leads by a clear margin
        # (near-ties, where any two programs' roundings may pick differently, are what a random
        # model has plenty of: its fp32 greedy run had margins of 0.2 % of the logits' range).
        for block in model.layers.values():  # the layers' writes into the residual stream: a part of it
            block.attn.wo.weight.mul_(LAYER_GAIN)
            block.mlp.down.weight.mul_(LAYER_GAIN)
        vocab = model.spec.vocab_size
        successor = (torch.arange(vocab) * 7 + 3) % vocab
        head = torch.empty_like(model.head.weight)
        head[successor] = model.embed.tok.weight
        model.head.weight.copy_(HEAD_GAIN * (head + 0.5 * model.head.weight))
    return model.eval()


def save_hf(directory: Path) -> Path:
    import alloy
    from bench.serve import byte_bpe

    alloy.save(build_model(), directory, overwrite=True)
    byte_bpe(spec().vocab_size)[0].save(str(directory / "tokenizer.json"))
    return directory


def tensor_data_sha256(path: Path) -> str:
    """SHA-256 over every tensor's name, type and bytes, by name (the metadata and the order of the
    tensors in the file aside: llama-quantize writes them in its own order)."""
    import gguf

    digest = hashlib.sha256()
    for t in sorted(gguf.GGUFReader(str(path)).tensors, key=lambda t: t.name):
        digest.update(t.name.encode() + int(t.tensor_type).to_bytes(4, "little") + bytes(t.data.tobytes()))
    return digest.hexdigest()


def alloy_greedy(path: Path) -> list[int]:
    import alloy
    from alloy.infer import generate
    from alloy.infer.optimize import prepare

    model = prepare(alloy.load(path), "q8_0")
    return generate(model, [PROMPT], max_new_tokens=NEW, eos_ids=())[0].tokens


def llama_server_greedy(path: Path) -> list[int]:
    import httpx

    from bench.decode import llama_binary
    from bench.serve import Server, free_port

    port = free_port()
    server = Server([llama_binary("llama-server"), "--model", str(path), "--port", str(port), "--threads", "2",
                     "--ctx-size", "256"], port).wait_ready()
    try:
        body = {"prompt": PROMPT, "n_predict": NEW, "temperature": 0.0, "top_k": 1, "cache_prompt": False,
                "return_tokens": True, "ignore_eos": True}
        return httpx.post(server.url + "/completion", json=body, timeout=120).json()["tokens"]
    finally:
        server.stop()


def main() -> None:
    from bench.decode import llama_binary

    root = Path(tempfile.mkdtemp(prefix="alloy-parity-"))
    hf = save_hf(root / "hf")
    f32, theirs, ours = root / "f32.gguf", root / "llama-q8_0.gguf", root / "alloy-q8_0.gguf"
    for out, dtype in ((f32, "fp32"), (ours, "q8_0")):
        subprocess.run([sys.executable, "-m", "alloy", "export", str(hf), "--format", "gguf", "--dtype", dtype,
                        "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([llama_binary("llama-quantize"), str(f32), str(theirs), "Q8_0", "2"], check=True,
                   capture_output=True)
    llama_tokens, alloy_tokens = llama_server_greedy(theirs), alloy_greedy(theirs)
    same = next((i for i, (a, b) in enumerate(zip(llama_tokens, alloy_tokens)) if a != b), min(len(llama_tokens),
                                                                                            len(alloy_tokens)))
    print(json.dumps({"llama_quantize_sha256": tensor_data_sha256(theirs), "alloy_export_sha256": tensor_data_sha256(ours),
                      "llama_cpp_tokens": llama_tokens, "alloy_tokens": alloy_tokens, "equal_prefix": same,
                      "files": str(root)}))


if __name__ == "__main__":
    main()
