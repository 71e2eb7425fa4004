"""Serving over processes (and machines): one torch.distributed rank per pipeline stage.

Rank 0 runs the HTTP server, the engine and stage 0. For each forward the engine asks for, rank 0
splits the rows into a group per rank and, group by group, runs its stage and sends on a header
(rows, new tokens and each row's cache length before this forward) and the hidden states. Every
other rank sets its own SlotCache's lengths from the header, runs its layers and sends on; the
last rank sends the last position's logits back to rank 0. Rank 0's cache is the only authority
on lengths, so the ranks need no other protocol; while rank 1 works on group g, rank 0 already
works on group g + 1.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from alloy.infer.partition import StageSpec

FORWARD, STOP = 0, 1
HEADER = 4  # op, first row, last row, new tokens; then the rows' cache lengths


class RemoteStages:
    """Rank 0's runner: its stage here, the others on ranks 1..world-1 (see the module doc)."""

    def __init__(self, model, world: int, activation_dtype: torch.dtype):
        self.model, self.world, self.activation_dtype = model, world, activation_dtype

    def build(self, max_batch: int, ctx_size: int | None) -> "RemoteStages":
        spec = self.model.spec
        self.spec, self.max_batch = spec, max_batch
        self.ctx_size = min(ctx_size or spec.max_seq_len, spec.max_seq_len)
        self.devices = [torch.device("cpu")]  # ids go in and logits come back through gloo, on the host
        self.caches = [self.model.new_cache(max_batch, self.ctx_size, slots=True)]
        self.stage_device = next(self.model.parameters()).device
        return self

    def forward(self, ids: torch.Tensor, first: int, last: int) -> torch.Tensor:
        groups = min(self.world, last - first)
        bounds = [first + round(i * (last - first) / groups) for i in range(groups + 1)]
        sends = []
        for a, b in zip(bounds, bounds[1:]):
            cache = self.caches[0].rows(a, b)
            header = header_for(FORWARD, a, b, ids.shape[1], cache.lengths, self.max_batch)
            x = self.model(ids[a - first:b - first].to(self.stage_device), cache=cache)
            sends.append(dist.isend(header, 1))
            sends.append(dist.isend(x.to("cpu", self.activation_dtype).contiguous(), 1))
        logits = []
        for a, b in zip(bounds, bounds[1:]):
            out = torch.empty(b - a, self.spec.vocab_size)
            dist.recv(out, self.world - 1)
            logits.append(out)
        for work in sends:
            work.wait()
        return torch.cat(logits)

    def close(self) -> None:
        if dist.is_initialized():
            dist.send(header_for(STOP, 0, 0, 0, torch.zeros(0, dtype=torch.long), self.max_batch), 1)


def header_for(op: int, first: int, last: int, tokens: int, lengths: torch.Tensor, max_batch: int) -> torch.Tensor:
    header = torch.zeros(HEADER + max_batch, dtype=torch.long)
    header[:HEADER] = torch.tensor([op, first, last, tokens])
    header[HEADER:HEADER + len(lengths)] = lengths.cpu()
    return header


def serve_stage(model, rank: int, world: int, max_batch: int, ctx_size: int | None, activation_dtype) -> None:
    """Ranks 1..world-1: forward what arrives until rank 0 says stop."""
    from alloy.infer.optimize import compute_dtype

    spec = model.spec
    cache = model.new_cache(max_batch, min(ctx_size or spec.max_seq_len, spec.max_seq_len), slots=True)
    device, dtype = next(model.parameters()).device, compute_dtype(model)
    with torch.inference_mode():
        while True:
            header = torch.empty(HEADER + max_batch, dtype=torch.long)
            dist.recv(header, rank - 1)
            op, a, b, tokens = header[:HEADER].tolist()
            if op == STOP:
                if rank < world - 1:
                    dist.send(header, rank + 1)
                return
            cache.lengths[a:b] = header[HEADER:HEADER + b - a]
            x = torch.empty(b - a, tokens, spec.hidden_size, dtype=activation_dtype)
            dist.recv(x, rank - 1)
            out = model(x.to(device, dtype), cache=cache.rows(a, b))
            if rank < world - 1:
                dist.send(header, rank + 1)
                dist.send(out.to("cpu", activation_dtype).contiguous(), rank + 1)
            else:
                dist.send(out[:, -1].float().cpu().contiguous(), 0)


def launch_server(job: dict, stages: list[StageSpec], api_key: str | None, rdzv=None) -> None:
    """Start this node's ranks (one per stage; stages split evenly over `rdzv.nnodes` nodes, node 0
    first) with torchrun and wait, until the server is stopped."""
    from alloy.runtime.launch import Rendezvous, launch

    rdzv = rdzv or Rendezvous()
    job = dict(job, stages=[asdict(s) for s in stages])
    env = dict(os.environ, **({"ALLOY_API_KEY": api_key} if api_key else {}))  # never written to the job file
    launch(job, len(stages) // rdzv.nnodes, rdzv=rdzv, timeout_s=10 * 365 * 86400.0, env=env,
           worker_module="alloy.serve.remote")


def run_rank(job: dict) -> None:
    import alloy
    from alloy.infer.distributed import stage_rank
    from alloy.infer.optimize import DTYPES

    # no timeout worth the name: a quiet server waits between requests for as long as it likes
    model, rank, world = stage_rank(job, timedelta(days=365))
    activation_dtype = DTYPES[job["dtype"]]
    if rank > 0:
        serve_stage(model, rank, world, job["max_batch"], job["ctx_size"], activation_dtype)
        return
    from alloy.serve.app import create_app, serve
    from alloy.serve.engine import Engine

    text_side = alloy.load(job["model_dir"], layers=(0, 0), embed=False, head=False)
    engine = Engine(RemoteStages(model, world, activation_dtype), tokenizer=text_side.tokenizer,
                    max_batch=job["max_batch"], max_queue=job["max_queue"], ctx_size=job["ctx_size"])
    app = create_app(text_side, model_name=job["name"], engine=engine, api_key=os.environ.get("ALLOY_API_KEY"),
                     plan_summary=job.get("plan_summary"))
    # HTTP from a thread, the engine (and stage 0) here; its loop's end tells the other ranks to stop
    serve(app, engine, host=job["host"], port=job["port"])


if __name__ == "__main__":
    try:
        run_rank(json.loads(Path(sys.argv[1]).read_text()))
    except __import__("alloy").AlloyError as err:
        print(f"alloy worker: {err}", file=sys.stderr)
        sys.exit(2)
