"""The same generation over processes: one torch.distributed rank per pipeline stage.

`generate_distributed` writes a job file and starts the ranks with torchrun (alloy.runtime.launch,
gloo). Rank r holds only stage r's layers; hidden states go rank to rank with send/recv, and the
last rank broadcasts the last position's logits [B, 1, vocab] to every rank, so each rank runs
the ordinary `stream` loop (same sampler, same seed, same tokens) and no rank needs a separate
control protocol. The last rank writes the result.

A stage with `experts` (alloy.infer.partition.ExpertSpec) holds a `RemoteMoE` in place of each
offloaded layer's MoE; one expert rank per such stage, after the S stage ranks, holds only those
MoE modules and answers each layer's hidden states with its MoE output. The logits broadcast then
goes over the stage ranks' own group.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from alloy.errors import ConfigError
from alloy.infer.partition import StageSpec, check_experts, expert_ranks
from alloy.infer.sampling import Sampling

_STOP = (0, -1)  # the header that ends an expert rank's loop: no rows


class RemoteMoE(nn.Module):
    """A layer's MoE run by an expert rank: sends the header [N, layer] and the hidden states as
    [N, hidden] rows (CPU, the job's activation dtype), gets the MoE output back. It holds no
    parameters, so the stage never holds that layer's experts."""

    def __init__(self, layer: int, peer: int, activation_dtype: torch.dtype):
        super().__init__()
        self.layer, self.peer, self.activation_dtype = layer, peer, activation_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        dist.send(torch.tensor([rows.shape[0], self.layer], dtype=torch.int64), self.peer)
        dist.send(rows.to("cpu", self.activation_dtype).contiguous(), self.peer)
        out = torch.empty(rows.shape, dtype=self.activation_dtype)
        dist.recv(out, self.peer)
        return out.to(x.device, x.dtype).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, rank={self.peer}"


class DistributedRunner:
    """A Runner whose stage lives on this rank; logits arrive on every stage rank (CPU, fp32).
    `world` counts the stage ranks; `group` is theirs where expert ranks share the job."""

    def __init__(self, model, rank: int, world: int, activation_dtype: torch.dtype, group=None):
        from alloy.infer.optimize import compute_dtype

        self.model, self.spec, self.rank, self.world, self.group = model, model.spec, rank, world, group
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
        dist.broadcast(logits, src=self.world - 1, group=self.group)
        return logits


def generate_distributed(model_dir, stages: list[StageSpec], prompts: list[list[int]], *, max_new_tokens: int,
                         sampling: Sampling = Sampling(), dtype: str = "fp32", eos_ids=None,
                         timeout_s: float = 300.0, timings: bool = False):
    """Token ids generated per prompt, with stage r of `stages` in torch.distributed rank r and
    each stage's experts (if it offloads any) in ranks S, S+1, ... With `timings`:
    (tokens, {"prefill_s", "decode_s", "decode_steps", "decode_tokens"}) as the last stage's rank
    saw them (wall time; decode_tokens counts every row of every step after the first)."""
    from alloy.infer.generate import validate
    from alloy.runtime.launch import launch
    from alloy.checkpoint import resolve_spec

    spec = resolve_spec(Path(model_dir) / "config.json")
    validate(spec, prompts, max_new_tokens)
    check_experts(spec, stages)
    with tempfile.TemporaryDirectory(prefix="alloy-generate-") as tmp:
        job = {"model_dir": str(model_dir), "stages": [asdict(s) for s in stages], "prompts": prompts,
               "max_new_tokens": max_new_tokens, "sampling": asdict(sampling), "dtype": dtype,
               "eos_ids": None if eos_ids is None else list(eos_ids), "out": str(Path(tmp) / "result.json"),
               "out_dir": tmp}
        launch(job, len(stages) + len(expert_ranks(stages)), timeout_s=timeout_s,
               worker_module="alloy.infer.distributed")
        result = json.loads(Path(job["out"]).read_text())
    return (result["tokens"], result["timings"]) if timings else result["tokens"]


def load_stage(model_dir, stages: list[StageSpec], rank: int, dtype: str = "fp32"):
    """Stage `rank` of `stages`, prepared for decoding in `dtype`; the MoE modules of its offloaded
    layers are RemoteMoEs talking to its expert rank, their tensors never read."""
    from alloy.infer.load import load_for_decoding
    from alloy.infer.optimize import DTYPES
    from alloy.checkpoint import resolve_spec

    stage, stand_ins = stages[rank], {}
    if stage.experts is not None:
        spec = resolve_spec(model_dir)
        peer = next(r for r, owner in expert_ranks(stages).items() if owner == rank)
        stand_ins = {f"layers.{i}.mlp": RemoteMoE(i, peer, DTYPES[dtype]) for i in range(*stage.experts.layers)
                     if spec.is_moe_layer(i)}  # a dense layer in the range stays here
    return load_for_decoding(model_dir, dtype, device=stage.device, layers=stage.layers, embed=stage.has_embed,
                             head=stage.has_head, stand_ins=stand_ins)


def stage_rank(job: dict, timeout: timedelta):
    """Join the job's process group and load this rank's stage of job["stages"], prepared for
    decoding in job["dtype"]: (model, rank, world). For serving, which has no expert ranks."""
    from alloy.runtime.launch import die_with_parent, init_gloo

    # torchrun gone: this rank goes too. A serving rank can wait in a gloo recv, where a Python
    # SIGTERM handler (the HTTP rank has one) never runs: one was left behind, re-parented to init.
    die_with_parent()
    stages = [StageSpec.from_dict(s) for s in job["stages"]]
    if expert_ranks(stages):
        raise ConfigError("serving does not run offloaded experts yet; use a plan without an expert placement")
    init_gloo(timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    return load_stage(job["model_dir"], stages, rank, job["dtype"]), rank, world


def run_rank(job: dict) -> None:
    """One rank of `generate_distributed`: a stage, or the expert rank of one; each in its device's
    CPU slice, if it is an emulated one."""
    from alloy.devices.emulate import slice_context
    from alloy.runtime.launch import die_with_parent, init_gloo

    die_with_parent()  # torchrun gone: this rank goes too (an expert rank would wait in recv for ever)
    stages = [StageSpec.from_dict(s) for s in job["stages"]]
    owners = expert_ranks(stages)
    rank = int(os.environ["RANK"])
    own_slice = stages[owners[rank]].experts.cpu_slice if rank in owners else stages[rank].cpu_slice
    with slice_context(own_slice):
        init_gloo(timeout=timedelta(seconds=120))
        # every rank takes part in making a group, the expert ranks too
        group = dist.new_group(ranks=list(range(len(stages)))) if owners else None
        if rank in owners:
            _run_experts(job, stages[owners[rank]], owners[rank])
        else:
            _run_stage(job, stages, rank, group)
        dist.destroy_process_group()


def _run_stage(job: dict, stages: list[StageSpec], rank: int, group) -> None:
    from alloy.infer.generate import stream
    from alloy.infer.optimize import DTYPES

    model = load_stage(job["model_dir"], stages, rank, job["dtype"])
    world = len(stages)
    runner = DistributedRunner(model, rank, world, DTYPES[job["dtype"]], group=group)
    prompts = job["prompts"]
    eos = set(model.spec.eos_token_id if job["eos_ids"] is None else job["eos_ids"])
    tokens: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    started = time.perf_counter()
    step_ends: list[float] = []
    for step in stream(runner, prompts, max_new_tokens=job["max_new_tokens"], sampling=Sampling(**job["sampling"]),
                       eos_ids=job["eos_ids"]):
        for row, t in enumerate(step.tolist()):
            if not finished[row]:
                tokens[row].append(t)
                finished[row] = t in eos
        step_ends.append(time.perf_counter())
    if stages[rank].experts is not None:
        peer = next(r for r, owner in expert_ranks(stages).items() if owner == rank)
        dist.send(torch.tensor(_STOP, dtype=torch.int64), peer)
    if rank == world - 1:
        decode_steps = len(step_ends) - 1
        timings = {"prefill_s": step_ends[0] - started, "decode_s": step_ends[-1] - step_ends[0],
                   "decode_steps": decode_steps, "decode_tokens": decode_steps * len(prompts)}
        Path(job["out"]).write_text(json.dumps({"tokens": tokens, "timings": timings}))


def _run_experts(job: dict, stage: StageSpec, owner: int) -> None:
    """Hold the MoE modules of `stage`'s offloaded layers and answer its rank (`owner`) until it
    sends no rows."""
    from alloy.infer.load import load_experts
    from alloy.infer.optimize import DTYPES

    spec = stage.experts
    experts = load_experts(job["model_dir"], spec.layers, job["dtype"], device=spec.device)
    activation_dtype, dtype = DTYPES[job["dtype"]], _experts_dtype(spec.device, job["dtype"])
    hidden = experts.spec.hidden_size
    header = torch.empty(2, dtype=torch.int64)
    with torch.inference_mode():
        while True:
            dist.recv(header, owner)
            rows, layer = header.tolist()
            if rows == 0:
                return
            if str(layer) not in experts:
                raise ConfigError(f"stage {owner} sent layer {layer} to the expert rank of layers {list(spec.layers)}")
            x = torch.empty(rows, hidden, dtype=activation_dtype)
            dist.recv(x, owner)
            out = experts[str(layer)](x.to(spec.device, dtype))
            dist.send(out.to("cpu", activation_dtype).contiguous(), owner)


def _experts_dtype(device: str, dtype: str) -> torch.dtype:
    """What `prepare` leaves MoE modules computing in (a stage reads it off its norms; the experts'
    weights may all be buffers): fp32 on a CPU with Alloy's kernels or in a GGUF block format,
    otherwise the dtype's activations."""
    from alloy import kernels
    from alloy.infer.optimize import DTYPES, QUANT_FORMATS

    if torch.device(device).type == "cpu" and (kernels.available() or dtype in QUANT_FORMATS):
        return torch.float32
    return DTYPES[dtype]


if __name__ == "__main__":
    try:
        run_rank(json.loads(Path(sys.argv[1]).read_text()))
    except __import__("alloy").AlloyError as err:
        print(f"alloy worker: {err}", file=sys.stderr)
        sys.exit(2)
