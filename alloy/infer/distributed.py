"""The same generation over processes: one torch.distributed rank per pipeline stage.

`generate_distributed` writes a job file and starts the ranks with torchrun (alloy.runtime.launch,
gloo). Rank r holds only stage r's layers; hidden states go rank to rank with send/recv, and the
last rank broadcasts the last position's logits [B, 1, vocab] to every rank, so each rank runs
the ordinary `stream` loop (same sampler, same seed, same tokens) and no rank needs a separate
control protocol. The last rank writes the result.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from alloy.infer.partition import StageSpec
from alloy.infer.sampling import Sampling


class DistributedRunner:
    """A Runner whose stage lives on this rank; logits arrive on every rank (CPU, fp32)."""

    def __init__(self, model, rank: int, world: int, activation_dtype: torch.dtype):
        from alloy.infer.optimize import compute_dtype

        self.model, self.spec, self.rank, self.world = model, model.spec, rank, world
        self.stage_device = next(model.parameters()).device
        self.device = torch.device("cpu")  # ids and logits: where gloo moves them
        # Hidden states travel in one dtype every rank agrees on; each rank computes in its own
        # (fp32 on a CPU with Alloy's kernels, bf16 on a GPU).
        self.activation_dtype, self.compute_dtype = activation_dtype, compute_dtype(model)

    def new_state(self, batch_size: int, max_len: int):
        return self.model.new_cache(batch_size, max_len)

    def __call__(self, ids, positions, attention_mask, state):
        B, T = ids.shape
        x = ids
        if self.rank > 0:
            x = torch.empty(B, T, self.spec.hidden_size, dtype=self.activation_dtype)
            dist.recv(x, self.rank - 1)
        dev = self.stage_device
        x = x.to(dev, self.compute_dtype) if x.is_floating_point() else x.to(dev)
        out = self.model(x, positions=None if positions is None else positions.to(dev),
                         attention_mask=None if attention_mask is None else attention_mask.to(dev), cache=state)
        if self.rank < self.world - 1:
            dist.send(out.to("cpu", self.activation_dtype).contiguous(), self.rank + 1)
            logits = torch.empty(B, 1, self.spec.vocab_size)
        else:
            logits = out[:, -1:].float().cpu().contiguous()
        dist.broadcast(logits, src=self.world - 1)
        return logits


def generate_distributed(model_dir, stages: list[StageSpec], prompts: list[list[int]], *, max_new_tokens: int,
                         sampling: Sampling = Sampling(), dtype: str = "fp32", eos_ids=None,
                         timeout_s: float = 300.0) -> list[list[int]]:
    """Token ids generated per prompt, with stage r of `stages` in torch.distributed rank r."""
    from alloy.infer.generate import validate
    from alloy.runtime.launch import launch
    from alloy.spec import resolve_spec

    validate(resolve_spec(Path(model_dir) / "config.json"), prompts, max_new_tokens)
    with tempfile.TemporaryDirectory(prefix="alloy-generate-") as tmp:
        job = {"model_dir": str(model_dir), "stages": [asdict(s) for s in stages], "prompts": prompts,
               "max_new_tokens": max_new_tokens, "sampling": asdict(sampling), "dtype": dtype,
               "eos_ids": None if eos_ids is None else list(eos_ids), "out": str(Path(tmp) / "result.json"),
               "out_dir": tmp}
        launch(job, len(stages), timeout_s=timeout_s, worker_module="alloy.infer.distributed")
        return json.loads(Path(job["out"]).read_text())["tokens"]


def stage_rank(job: dict, timeout: timedelta):
    """Join the job's process group and load this rank's stage of job["stages"], prepared for
    decoding in job["dtype"]: (model, rank, world). Shared by generation and serving."""
    from alloy.infer.load import load_for_decoding
    from alloy.runtime.launch import init_gloo

    init_gloo(timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    stage = StageSpec(**{**job["stages"][rank], "layers": tuple(job["stages"][rank]["layers"])})
    model = load_for_decoding(job["model_dir"], job["dtype"], device=stage.device, layers=stage.layers,
                              embed=stage.has_embed, head=stage.has_head)
    return model, rank, world


def run_rank(job: dict) -> None:
    from alloy.infer.generate import stream
    from alloy.infer.optimize import DTYPES

    model, rank, world = stage_rank(job, timedelta(seconds=120))
    runner = DistributedRunner(model, rank, world, DTYPES[job["dtype"]])
    prompts = job["prompts"]
    eos = set(model.spec.eos_token_id if job["eos_ids"] is None else job["eos_ids"])
    tokens: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for step in stream(runner, prompts, max_new_tokens=job["max_new_tokens"], sampling=Sampling(**job["sampling"]),
                       eos_ids=job["eos_ids"]):
        for row, t in enumerate(step.tolist()):
            if not finished[row]:
                tokens[row].append(t)
                finished[row] = t in eos
    if rank == world - 1:
        Path(job["out"]).write_text(json.dumps({"tokens": tokens}))
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        run_rank(json.loads(Path(sys.argv[1]).read_text()))
    except __import__("alloy").AlloyError as err:
        print(f"alloy worker: {err}", file=sys.stderr)
        sys.exit(2)
