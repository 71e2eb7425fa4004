"""Serving tokens/s and latency: Alloy's OpenAI-compatible server vs. llama.cpp's, same weights.

One random-weight Llama (seed 0; decode.py's sizes: quick h256/4 layers/vocab 2048, full the ~98M
h768/12 layers/ffn 2048/vocab 8192, untied) is saved as an HF directory, which `alloy serve` loads,
and exported with `alloy export --format gguf`, which llama.cpp loads. Both servers get 2 threads.
For each concurrency (1, 4, 16; quick 1, 4) that many streaming clients send their own short
prompts to /v1/completions (greedy, max_tokens 64; quick 24), back to back, the same number of
requests per level. Figures per level: total generated tokens/s (all tokens over the wall time
from the first request's start to the last one's end), time to first token and inter-token
latency p50/p99 from the SSE chunk arrival times.

The tokenizer is a byte-level BPE whose tokens past the 256 bytes are two printable ASCII
characters each; the head rows of every other token are zeroed, so greedy decoding never picks
them (logit 0, below the max of the random logits). Every generated token is then two characters
of text on both servers, and EOS never cuts a request short: tokens are counted from the text.

Baselines (optional): "llamacpp" is llama-cpp-python's server (pip install 'alloy-lm[bench]', which
builds llama.cpp); it runs one request at a time, so concurrent clients queue. "llama-server" is
llama.cpp's own C++ server with continuous batching (--parallel), run when a `llama-server`
binary is on PATH or named by $LLAMA_SERVER (build it from llama.cpp's source: cmake -DLLAMA_BUILD_SERVER=ON
-DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF, then cmake --build B --target llama-server).
Run one measurement: python -m bench.serve --impl alloy|llamacpp|llama-server [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

THREADS = 2
LEVELS = {"quick": (1, 4), "full": (1, 4, 16)}
MAX_TOKENS = {"quick": 24, "full": 64}
REQUESTS_PER_LEVEL = {"quick": 8, "full": 16}  # split over the clients: the same work at every level
MODEL_NAME = "bench"
START_TIMEOUT_S = 300.0
WORDS = ("river stone lantern garden winter harbor meadow candle forest signal silver thunder "
         "orchard compass feather mirror").split()


# ---- the model: HF directory + tokenizer.json + GGUF, built once per size ----------------------

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what byte-level BPE vocabularies are spelled in)."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = keep[:] + [256 + n for n in range(256 - len(keep))]
    order = keep + [b for b in range(256) if b not in keep]
    return {b: chr(c) for b, c in zip(order, chars)}


def byte_bpe(vocab_size: int):
    """(tokenizer, first pair id): <s>, </s>, the 256 bytes, then two-character ASCII tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1}
    vocab.update({ch: 2 + b for b, ch in bytes_to_unicode().items()})
    first_pair = len(vocab)
    # letters first, so the pairs a prompt of lowercase words needs are in even the small vocabulary
    alphabet = "etaoinsrhldcumfpgwybvkxjqz0123456789"
    alphabet += "".join(c for c in map(chr, range(33, 127)) if c not in alphabet)
    rank = {c: i for i, c in enumerate(alphabet)}
    pairs = sorted(itertools.product(alphabet, repeat=2), key=lambda p: (max(rank[p[0]], rank[p[1]]), p))
    merges = pairs[: vocab_size - first_pair]
    vocab.update({a + b: first_pair + i for i, (a, b) in enumerate(merges)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return tokenizer, first_pair


def model_files(size: str) -> tuple[Path, Path]:
    """(HF directory, GGUF file) for `size`, built on first use and cached in the temp directory."""
    root = Path(tempfile.gettempdir()) / f"alloy-bench-serve-{size}-v1"
    hf_dir, gguf = root / "hf", root / "model.gguf"
    if gguf.is_file():
        return hf_dir, gguf
    import torch
    import transformers

    from bench.decode import hf_config

    building = root.with_name(root.name + f".building-{os.getpid()}")
    config = hf_config(size)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 0, 1, None
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    tokenizer, first_pair = byte_bpe(config.vocab_size)
    with torch.no_grad():  # only two-character tokens can win a greedy step (see the docstring)
        model.lm_head.weight[:first_pair] = 0
    model.save_pretrained(building / "hf")
    tokenizer.save(str(building / "hf" / "tokenizer.json"))
    subprocess.run([sys.executable, "-m", "alloy", "export", str(building / "hf"), "--format", "gguf",
                    "--out", str(building / "model.gguf")], check=True, stdout=subprocess.DEVNULL)
    if not gguf.is_file():  # another process may have won the race; its files are the same
        shutil.rmtree(root, ignore_errors=True)
        building.rename(root)
    shutil.rmtree(building, ignore_errors=True)
    return hf_dir, gguf


# ---- the servers --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_binary() -> str | None:
    return os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")


def server_argv(impl: str, hf_dir: Path, gguf: Path, port: int, max_batch: int) -> list[str]:
    if impl == "alloy":
        return [sys.executable, "-m", "alloy", "serve", str(hf_dir), "--port", str(port), "--name", MODEL_NAME,
                "--threads", str(THREADS), "--max-batch", str(max_batch)]
    if impl == "llamacpp":
        # interrupt_requests defaults to True: a queued request would cut the streaming one short
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL_NAME,
                "--port", str(port), "--n_threads", str(THREADS), "--n_threads_batch", str(THREADS),
                "--n_ctx", "1024", "--interrupt_requests", "False"]
    # llama.cpp splits --ctx-size over the --parallel slots: each slot gets the 1024 the others have
    return [llama_server_binary(), "--model", str(gguf), "--alias", MODEL_NAME, "--port", str(port),
            "--threads", str(THREADS), "--threads-batch", str(THREADS), "--parallel", str(max_batch),
            "--ctx-size", str(1024 * max_batch), "--cont-batching"]


class Server:
    """A server subprocess, up once GET /v1/models answers; its output goes to a log file."""

    def __init__(self, argv: list[str], port: int):
        self.argv, self.url = argv, f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> "Server":
        import httpx

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[:4]} exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.argv[:4]} did not answer in {START_TIMEOUT_S:.0f} s:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---- the load -----------------------------------------------------------------------------------

def prompt(i: int) -> str:
    """A short prompt of its own for request i (lowercase words: both tokenizers split them alike)."""
    a, b, c = WORDS[i % 16], WORDS[(i // 16 + 3 * i + 5) % 16], WORDS[(7 * i + 11) % 16]
    return f"the {a} and the {b} went down to the {c} to find what the {a} had left"


def new_client():
    """An HTTP client that opens a connection per request: llama-server (cpp-httplib) sometimes drops a
    kept-alive connection after a streamed response, and every server gets the same treatment."""
    import httpx

    return httpx.Client(timeout=600, limits=httpx.Limits(max_keepalive_connections=0))


def stream_one(client, url: str, text: str, max_tokens: int) -> dict:
    """One streamed completion: request start, each token's arrival time, the text."""
    # repeat_penalty: llama-cpp-python's server defaults to 1.1, a different greedy text (Alloy ignores it)
    body = {"model": MODEL_NAME, "prompt": text, "max_tokens": max_tokens, "temperature": 0, "repeat_penalty": 1.0,
            "stream": True}
    started_s = time.perf_counter()
    arrivals_s, pieces = [], []
    with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}: {response.read().decode()[:500]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = json.loads(line[len("data: "):])
            if "error" in doc:
                raise RuntimeError(f"{url}: {doc['error']}")
            piece = (doc["choices"][0].get("text") or "") if doc.get("choices") else ""
            now = time.perf_counter()
            arrivals_s += [now] * (len(piece) // 2)  # two characters per token (see the docstring)
            pieces.append(piece)
    return {"started_s": started_s, "ended_s": time.perf_counter(), "arrivals_s": arrivals_s,
            "text": "".join(pieces)}


def run_level(url: str, clients: int, requests: int, max_tokens: int) -> tuple[dict, list[dict]]:
    """`clients` threads, each sending its share of `requests` one after another."""
    import numpy as np

    results: list[dict] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients)

    def client_loop(c: int) -> None:
        try:
            with new_client() as client:
                barrier.wait()  # all clients start together
                for i in range(c, requests, clients):
                    results.append(stream_one(client, url, prompt(i), max_tokens) | {"index": i})
        except BaseException as err:  # reported after the join
            errors.append(err)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    tokens = sum(len(r["arrivals_s"]) for r in results)
    wall_s = max(r["ended_s"] for r in results) - min(r["started_s"] for r in results)
    ttft_s = [r["arrivals_s"][0] - r["started_s"] for r in results if r["arrivals_s"]]
    itl_s = [b - a for r in results for a, b in zip(r["arrivals_s"], r["arrivals_s"][1:])]
    p = lambda values, q: float(np.percentile(values, q)) if values else float("nan")  # noqa: E731
    figures = {f"c{clients}_tokens_per_s": tokens / wall_s,
               f"c{clients}_ttft_p50_s": p(ttft_s, 50), f"c{clients}_ttft_p99_s": p(ttft_s, 99),
               f"c{clients}_itl_p50_s": p(itl_s, 50), f"c{clients}_itl_p99_s": p(itl_s, 99),
               f"c{clients}_short_requests": sum(len(r["arrivals_s"]) != max_tokens for r in results)}
    return figures, sorted(results, key=lambda r: r["index"])


def measure(impl: str, size: str) -> dict:
    hf_dir, gguf = model_files(size)
    port = free_port()
    argv = server_argv(impl, hf_dir, gguf, port, max(LEVELS[size]))
    server = Server(argv, port)
    try:
        server.wait_ready()
        with new_client() as client:  # warm-up: first-call allocations, kernel set-up
            stream_one(client, server.url, prompt(999), 4)
        out: dict = {}
        texts: list[str] = []
        for clients in LEVELS[size]:
            figures, results = run_level(server.url, clients, REQUESTS_PER_LEVEL[size], MAX_TOKENS[size])
            out |= figures
            texts = texts or [r["text"] for r in results]
    finally:
        server.stop()
    # Not figures (strings): what ran, and the greedy texts, so report() can compare the servers.
    return out | {"server_threads": THREADS, "server_argv": " ".join(a.replace(str(hf_dir.parent), "$MODEL")
                                                                        for a in argv[1:]),
                  "texts": texts}


# ---- the harness's side -------------------------------------------------------------------------

def baseline_missing() -> dict[str, str]:
    """Baselines this machine cannot run, with the reason."""
    missing = {}
    absent = [m for m in ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings")
              if importlib.util.find_spec(m) is None]
    if absent:
        missing["llamacpp"] = (f"{', '.join(absent)} not installed: pip install 'alloy-lm[bench]' "
                               "(compiles llama.cpp: ~5 min on 2 cores)")
    if not llama_server_binary():
        missing["llama-server"] = "no llama-server binary on PATH and $LLAMA_SERVER unset"
    return missing


def variants(quick: bool) -> dict[str, list[str]]:
    size = ["--quick"] if quick else []
    missing = baseline_missing()
    for name, why in missing.items():
        print(f"  (serve: baseline {name} left out: {why})", file=sys.stderr)
    # PAIRS depends on the levels the mode runs; the harness reads it after calling variants()
    PAIRS[:] = [("alloy", base, f"c{c}_tokens_per_s") for base in ("llamacpp", "llama-server")
                for c in LEVELS["quick" if quick else "full"]]
    return {impl: ["--impl", impl, *size] for impl in ("alloy", "llamacpp", "llama-server") if impl not in missing}


PAIRS: list[tuple[str, str, str]] = []  # filled by variants()


def headline(summary: dict, machine_flops: dict[str, float]) -> dict:
    out = {}
    for name, figures in summary["figures"].items():
        for key, s in figures.items():
            if key.endswith("tokens_per_s"):
                out[f"{name.replace('-', '_')}_{key}"] = s["median"]
    for key, s in summary["ratios"].items():
        a, rest = key.split("/", 1)
        b, figure = rest.split(":")
        out[f"ratio_{a}_vs_{b.replace('-', '_')}_{figure}"] = s["median"]
    return out


def report(samples: dict[str, list[dict]]) -> str:
    lines = ["", "server commands (threads per server: %d):" % THREADS]
    lines += [f"  {name}: {runs[0]['server_argv']}" for name, runs in samples.items()]
    for name, why in baseline_missing().items():
        lines.append(f"  {name}: not run ({why})")
    if "alloy" in samples:  # same weights, same prompt ids, greedy: the texts should agree
        ours = samples["alloy"][0]["texts"]
        for name, runs in samples.items():
            if name != "alloy":
                same = sum(a == b for a, b in zip(ours, runs[0]["texts"]))
                lines.append(f"  greedy texts alloy vs {name}: {same}/{len(ours)} identical (concurrency 1)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["alloy", "llamacpp", "llama-server"], required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(measure(args.impl, "quick" if args.quick else "full")))


if __name__ == "__main__":
    main()
