"""A model split into contiguous layer ranges over several devices, driven by one process.

Only hidden states [B, T, hidden] move between devices. With one request group the stages run
one after another (a model that does not fit one device still runs); with several groups
(micro-batches of the batch's rows) each stage has its own thread, so while stage s works on
group g, stage s - 1 already works on group g + 1 — more than one device busy at a time.
PyTorch ops release the GIL, so the threads overlap on CPU and CUDA alike.

Over processes (alloy.infer.distributed) a stage may also hand the MoE modules (router and
experts) of some of its layers to a device of their own (`ExpertSpec`): one more rank holds and
runs them, the stage keeps attention — llama.cpp's `--override-tensor exps=CPU`.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import torch

from alloy.devices import torch_device
from alloy.errors import ConfigError
from alloy.infer.optimize import compute_dtype
from alloy.model import Transformer


@dataclass(frozen=True)
class ExpertSpec:
    """The MoE modules of a stage's layers [a, b), held and run by another rank on `device`."""

    device: str  # torch device string
    layers: tuple[int, int]
    cpu_slice: dict | None = None  # an emulated device's alloy.devices.CpuSlice, as a dict


@dataclass(frozen=True)
class StageSpec:
    device: str  # torch device string: "cpu", "cuda:0", ...
    layers: tuple[int, int]
    has_embed: bool
    has_head: bool
    experts: ExpertSpec | None = None  # these layers' experts run on an expert rank (processes only)
    cpu_slice: dict | None = None  # an emulated device's alloy.devices.CpuSlice, as a dict

    @classmethod
    def from_dict(cls, data: dict) -> "StageSpec":
        """Back from dataclasses.asdict (a job file): tuples and the ExpertSpec rebuilt."""
        experts = data.get("experts")
        if experts is not None:
            experts = ExpertSpec(**{**experts, "layers": tuple(experts["layers"])})
        return cls(**{**data, "layers": tuple(data["layers"]), "experts": experts})


def expert_ranks(stages: list[StageSpec]) -> dict[int, int]:
    """{expert rank: index of the stage it serves}: one rank per stage with experts, after the
    stages' ranks 0..S-1, in stage order."""
    owners = [s for s, stage in enumerate(stages) if stage.experts is not None]
    return {len(stages) + k: s for k, s in enumerate(owners)}


def check_experts(spec, stages: list[StageSpec]) -> None:
    """A ConfigError unless every stage's expert layers are a non-empty range inside the stage's own
    layers with at least one MoE layer (a dense layer in the range stays with its stage)."""
    for s, stage in enumerate(stages):
        if stage.experts is None:
            continue
        (first, last), (a, b) = stage.layers, stage.experts.layers
        if not first <= a < b <= last:
            raise ConfigError(f"stage {s} holds layers [{first}, {last}); its expert layers [{a}, {b}) must be a "
                              "non-empty range within them")
        if not any(spec.is_moe_layer(i) for i in range(a, b)):
            what = "has no experts" if not spec.num_experts else "has only dense layers there"
            raise ConfigError(f"stage {s} offloads the experts of layers [{a}, {b}), but {spec.family} {what}")


def stages_from_plan(plan, replica: int = 0) -> list[StageSpec]:
    """The stages of one replica of an inference Plan, devices mapped to this machine's torch devices;
    an emulated device's CPU slice and a stage's expert placement come along."""
    from alloy.spec import ModelSpec

    if plan.task != "infer":
        raise ConfigError(f"the plan is for {plan.task!r}; generation needs a plan made with --task infer")
    profiles = {d.name: d for d in plan.devices}
    out = []
    for stage in plan.replicas[replica].stages:
        experts = None
        if stage.experts is not None:
            placed = stage.experts
            experts = ExpertSpec(_stage_device(profiles.get(placed.device), placed.device), tuple(placed.layers),
                                 _cpu_slice(profiles.get(placed.device)))
        out.append(StageSpec(_stage_device(profiles.get(stage.device), stage.device), tuple(stage.layers),
                             stage.has_embed, stage.has_head, experts, _cpu_slice(profiles.get(stage.device))))
    if any(s.experts is not None for s in out):
        check_experts(ModelSpec.from_dict(plan.model.spec), out)
    return out


def _cpu_slice(profile) -> dict | None:
    cpu_slice = getattr(profile, "cpu_slice", None)
    return None if cpu_slice is None else cpu_slice.model_dump()


def _stage_device(profile, name: str) -> str:
    """A plan stage's device as a torch device string here (alloy.devices.torch_device's rule),
    checked to exist: generation drives CPUs and this machine's CUDA GPUs."""
    kind = profile.kind if profile is not None else name.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"the plan puts a stage on {name} ({kind}), which generation here cannot drive")
    device = torch_device(name, kind)
    if device.type == "cuda" and (not torch.cuda.is_available() or device.index >= torch.cuda.device_count()):
        raise ConfigError(f"the plan puts a stage on {name}, but this machine has no such CUDA device")
    return str(device)


def even_split(num_layers: int, devices: list[str]) -> list[StageSpec]:
    """Contiguous, near-equal layer ranges (for tests and explicit --split requests)."""
    n = len(devices)
    bounds = [round(i * num_layers / n) for i in range(n + 1)]
    return [StageSpec(d, (bounds[i], bounds[i + 1]), i == 0, i == n - 1) for i, d in enumerate(devices)]


class Pipeline:
    """A Runner (see alloy.infer.generate) over stage models on their devices."""

    def __init__(self, stages: list[Transformer], micro_batches: int = 1):
        if not stages or not stages[0].has_embed or not stages[-1].has_head:
            raise ConfigError("a pipeline needs the embeddings on its first stage and the head on its last")
        for prev, nxt in zip(stages, stages[1:]):
            if prev.layer_range[1] != nxt.layer_range[0]:
                raise ConfigError(f"stages do not join: layers {prev.layer_range} then {nxt.layer_range}")
        if micro_batches < 1:
            raise ConfigError(f"micro_batches must be >= 1, got {micro_batches}")
        self.stages, self.spec, self.micro_batches = stages, stages[0].spec, micro_batches
        self.devices = [next(s.parameters()).device for s in stages]
        self.dtypes = [compute_dtype(s) for s in stages]  # a CPU stage may compute in fp32, a GPU one in bf16
        self.device = self.devices[0]

    @classmethod
    def load(cls, directory, stage_specs: list[StageSpec], *, dtype: str = "fp32", micro_batches: int = 1):
        """Load only each stage's tensors onto its device, prepared for decoding in `dtype`."""
        from alloy.infer.load import load_for_decoding

        models = [load_for_decoding(directory, dtype, device=s.device, layers=s.layers, embed=s.has_embed,
                                    head=s.has_head) for s in stage_specs]
        return cls(models, micro_batches)

    def new_state(self, batch_size: int, max_len: int):
        groups = _row_groups(batch_size, self.micro_batches)
        return [(rows, [s.new_cache(len(rows), max_len) for s in self.stages]) for rows in groups]

    def __call__(self, ids, positions, attention_mask, state):
        work = [(ids[rows], _rows(positions, rows), _rows(attention_mask, rows), caches) for rows, caches in state]
        return self.run_groups(work)

    def run_groups(self, work):
        """[(x, positions, mask, caches per stage)] -> outputs concatenated in order: one group
        runs stage after stage; several flow through the stages' threads, overlapped."""
        outs = self._run_sequential(work) if len(work) == 1 or len(self.stages) == 1 else self._run_overlapped(work)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _stage(self, s: int, x, positions, mask, cache):
        device = self.devices[s]
        x = x.to(device, self.dtypes[s]) if x.is_floating_point() else x.to(device)
        return self.stages[s](x, positions=_to(positions, device), attention_mask=_to(mask, device),
                              cache=cache)

    def _run_sequential(self, work):
        outs = []
        for x, positions, mask, caches in work:
            for s in range(len(self.stages)):
                x = self._stage(s, x, positions, mask, caches[s])
            outs.append(x.to(self.device))
        return outs

    def _run_overlapped(self, work):
        """One thread per stage, a queue between neighbours; groups flow through in order."""
        queues = [queue.Queue() for _ in range(len(self.stages) + 1)]
        errors: list[BaseException] = []

        def worker(s: int):
            with torch.inference_mode():
                for _ in work:
                    g, x = queues[s].get()
                    if x is not None and not errors:
                        try:
                            _, positions, mask, caches = work[g]
                            x = self._stage(s, x, positions, mask, caches[s])
                        except BaseException as err:  # handed to the caller below
                            errors.append(err)
                            x = None
                    queues[s + 1].put((g, x))

        threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in range(len(self.stages))]
        for t in threads:
            t.start()
        for g, (x, *_rest) in enumerate(work):
            queues[0].put((g, x))
        outs = [None] * len(work)
        for _ in work:
            g, x = queues[-1].get()
            outs[g] = x
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return [o.to(self.device) for o in outs]


def _row_groups(batch_size: int, micro_batches: int) -> list[list[int]]:
    n = min(batch_size, micro_batches)
    bounds = [round(i * batch_size / n) for i in range(n + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(n)]


def _rows(t, rows):
    return None if t is None else t[rows]


def _to(t, device):
    return None if t is None else t.to(device)
