"""Training step time of published heterogeneous 3D-parallel plans (Sailor, AMP).

The step-time formula is Alloy's (`alloy.plan.timing.pipeline_time_s`: 1F1B, the first
micro-batch crosses every stage, the rest follow at the slowest slot; a slot is a stage's
forward+backward plus its sends), fed with *measured* per-layer times instead of FLOP
estimates, and with the artifacts' measured link bandwidths. What Alloy's own `Layout` cannot
express here is evaluated the same way, stage by stage:
- a stage is a tensor-parallel group (the plan's TP degree is a fixed input, the profile was
  measured at that degree), and replicas of one stage may be different GPU types;
- the gradient all-reduce is per stage, among that stage's replicas, on their slowest link
  (Megatron-DeepSpeed's data-parallel groups), followed by the optimizer update.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from alloy.plan.timing import interpolate, pipeline_time_s

SAILOR = "sailor/sailor"
SUSPECT = ("mit/N6/plan_config_N6_D2.json", "clariden/GPT-NEO/N4/plan_config_N4_D4.json")
SAILOR_MODELS = {"OPT-350": "training_config_opt_350.json", "GPT-NEO": "training_config_gpt_neo27.json"}
PROFILE_NAMES = {"OPT-350": "OPT-350", "GPT-NEO": "GPT-Neo-2.7"}
FP32_BYTES = 4


def _bandwidth_Bps(entry, nbytes: float) -> float:
    """Sailor's fit: GB/s = a L^2 + b L + c, L = log2(bytes / 1e6), capped at the best measured."""
    (a, b, c), best = entry
    level = math.log2(max(nbytes, 1.0) / 1e6)
    fitted = (a * level * level + b * level + c) * 1e9
    return min(best, fitted) if fitted > 0 else best


@dataclass(frozen=True)
class SailorData:
    profiles: dict
    llm_info: dict
    network: dict
    configs: dict

    @classmethod
    def load(cls, root: Path) -> "SailorData":
        base = root / SAILOR
        read = lambda p: json.loads((base / p).read_text())  # noqa: E731
        return cls(profiles=read("Planner/simulations/profiles_tmp.json"), llm_info=read("Planner/llm_info.json"),
                   network=read("providers/multizone_bandwidths_het.json"),
                   configs={m: read(f"Planner/simulations/configs/{f}") for m, f in SAILOR_MODELS.items()})

    def slot_times(self, model: str, gpu: str, mbs: int, tp: int, slot: int) -> tuple[float, float, float]:
        """(fwd, bwd, update) seconds of one layer slot, interpolated in micro-batch size."""
        by_mbs = self.profiles[PROFILE_NAMES[model]][gpu]
        sizes = sorted(int(k) for k in by_mbs if str(tp) in by_mbs[k])
        rows = [by_mbs[str(s)][str(tp)][str(slot)] for s in sizes]
        return tuple(interpolate(sizes, [r[k] for r in rows], mbs) for k in range(3))

    def link_Bps(self, zone: str, a: tuple[str, int], b: tuple[str, int], nbytes: float) -> float:
        return _bandwidth_Bps(self.network[zone][a[0]][str(a[1])][zone][b[0]][str(b[1])], nbytes)


@dataclass(frozen=True)
class StagePlan:
    slots: tuple[int, ...]
    replicas: tuple[tuple[str, int, int], ...]  # (gpu type, gpus in its VM, tensor-parallel degree)


@dataclass(frozen=True)
class SailorPlan:
    name: str
    model: str  # "OPT-350" or "GPT-NEO"
    zone: str
    stages: tuple[StagePlan, ...]
    mbs: int
    gbs: int
    measured_s: float | None = None

    @property
    def dp(self) -> int:
        return len(self.stages[0].replicas)


def read_sailor_plan(path: Path, name: str = "") -> SailorPlan:
    doc = json.loads(Path(path).read_text())
    pipe = doc["pipeline_list"][0]
    stages = []
    for slots, replicas in zip(pipe["layers_per_stage"], pipe["tmp_per_stage"]):
        stages.append(StagePlan(tuple(slots), tuple((r[0][0][0], r[0][0][1], r[1]) for r in replicas)))
    model = "GPT-NEO" if "/GPT-NEO/" in str(path) else "OPT-350"
    return SailorPlan(name or str(path), model, doc.get("zone", "us-central1-a"), tuple(stages),
                      doc["mbs"], doc["gbs"], doc.get("real"))


def sailor_plans(root: Path, cluster: str, skip_suspect: bool = True) -> list[SailorPlan]:
    base = root / SAILOR / "Planner/simulations/validation"
    plans = []
    for path in sorted((base / cluster).rglob("plan_config_*.json")):
        rel = str(path.relative_to(base))
        if skip_suspect and rel in SUSPECT:
            continue
        plans.append(read_sailor_plan(path, rel))
    return plans


def sailor_step_s(data: SailorData, plan: SailorPlan) -> float:
    """Predicted seconds per iteration of a Sailor plan."""
    cfg = data.configs[plan.model]
    act_bytes = plan.mbs * cfg["sequence_length"] * cfg["hidden_size"] * FP32_BYTES
    micro_batches = max(1, plan.gbs // (plan.mbs * plan.dp))
    pipelines = []
    for r in range(plan.dp):
        slots = []
        for s, stage in enumerate(plan.stages):
            gpu, vm, tp = stage.replicas[r]
            compute = sum(sum(data.slot_times(plan.model, gpu, plan.mbs, tp, k)[:2]) for k in stage.slots)
            send = 0.0
            if s + 1 < len(plan.stages):
                nxt = plan.stages[s + 1].replicas[r]
                send = 2 * act_bytes / data.link_Bps(plan.zone, (gpu, vm), (nxt[0], nxt[1]), act_bytes)
            slots.append(compute + send)
        pipelines.append(pipeline_time_s(slots, micro_batches))
    sync = 0.0
    for stage in plan.stages:
        gpu, vm, tp = stage.replicas[0]
        params = sum(data.llm_info[PROFILE_NAMES[plan.model] if plan.model != "GPT-NEO" else "GPT-Neo-2.7"]
                     [str(tp)][str(k)]["params_bytes"] for k in stage.slots) if _has_info(data, plan, tp) else 0.0
        d = len(stage.replicas)
        allreduce = 0.0
        if d > 1:
            bw = min(data.link_Bps(plan.zone, (a[0], a[1]), (b[0], b[1]), params / d)
                     for i, a in enumerate(stage.replicas) for b in stage.replicas[i + 1:])
            allreduce = 2 * (d - 1) / d * params / bw
        update = max(sum(data.slot_times(plan.model, g, plan.mbs, t, k)[2] for k in stage.slots)
                     for g, _, t in stage.replicas)
        sync = max(sync, allreduce + update)
    return max(pipelines) + sync


def _has_info(data: SailorData, plan: SailorPlan, tp: int) -> bool:
    name = "GPT-Neo-2.7" if plan.model == "GPT-NEO" else PROFILE_NAMES[plan.model]
    return name in data.llm_info and str(tp) in data.llm_info[name]


# ---- AMP (GPT-2 on AWS) -------------------------------------------------------------------------

@dataclass(frozen=True)
class AmpTrial:
    trial: int
    mbs: int
    mp: int
    dp: int
    pp: int
    boundaries: tuple[int, ...]
    amp_predicted_s: float
    measured_s: float | None


def amp_trials(root: Path, experiment: str) -> list[AmpTrial]:
    rows = csv.DictReader((root / "AMP/derived/trials_predicted_vs_measured.csv").open())
    out = []
    for r in rows:
        if r["experiment"] != experiment:
            continue
        out.append(AmpTrial(int(r["trial"]), int(r["mbs"]), int(r["mp"]), int(r["dp"]), int(r["pp"]),
                            tuple(int(x) for x in r["partition_boundaries"].split()),
                            float(r["predicted_iter_s"]),
                            float(r["measured_iter_s"]) if r["measured_iter_s"] else None))
    return out


def amp_forward_s(root: Path) -> dict[tuple[str, int], list[float]]:
    """(gpu "V100"/"T4", mp) -> forward seconds of each of the 30 layer slots at micro-batch 1."""
    table: dict[tuple[str, int], dict[int, float]] = {}
    for r in csv.DictReader((root / "AMP/derived/layer_forward_time.csv").open()):
        gpu = "V100" if r["instance"] == "P3" else "T4"
        table.setdefault((gpu, int(r["mp_degree"])), {})[int(r["layer_index"])] = float(r["fwd_time_s_at_microbatch1"])
    return {k: [v[i] for i in sorted(v)] for k, v in table.items()}


# AMP's own cost model moves fp32 on the wire: its scripts divide the link bandwidth by 32 bits per
# element (`clusters.json` _units), for activations and gradients alike.
AMP_WIRE_BYTES = 4
AMP_VOCAB = 52256  # GPT-2 vocabulary (clusters.json model string); tied input embedding lives in stage 0
AMP_SLOTS = 30  # layer slots of AMP's profile; slots 2..25 are the 24 transformer layers


def amp_layer_s(fwd: dict[tuple[str, int], list[float]], gpu: str, mp: int, lo: int, hi: int, mbs: int,
                intra_Bps: float, seq: int = 1024, hidden: int = 1024) -> float:
    """Forward+backward seconds of slots [lo, hi) for one micro-batch of `mbs` on one rank of an mp-group.

    AMP's convention (3x the measured forward, linear in micro-batch size) holds at mp = 1. Its mp > 1
    profiles, taken at micro-batch 1, are SLOWER than mp = 1 (V100 5.2 / 4.5 ms vs 3.9 ms a layer), so
    most of what they measured does not divide among the ranks and does not grow with the micro-batch.
    Split each mp > 1 slot time t_k into a per-sample part w = t_1 / k + the two Megatron all-reduces of
    the layer's b*s*h activations on the node's link (ring: 2 (k-1)/k x bytes / bandwidth), and a fixed
    per-micro-batch part c = t_k - w; the micro-batch costs 3 (c + mbs * w). That per-sample work divides
    by k is what Sailor's measured V100 OPT-350 profile (same h = 1024, 24 layers) shows: tp4 / tp1 per
    sample = 0.27 (fwd+bwd, mbs 1 -> 4).
    """
    t_k = fwd[(gpu, mp)][lo:hi]
    if mp == 1:
        return 3 * mbs * sum(t_k)
    comm = 2 * 2 * (mp - 1) / mp * seq * hidden * AMP_WIRE_BYTES / intra_Bps
    total = 0.0
    for i, (t, t1) in enumerate(zip(t_k, fwd[(gpu, 1)][lo:hi])):
        w = t1 / mp + (comm if 2 <= lo + i < AMP_SLOTS - 4 else 0.0)
        w = min(w, t)
        total += 3 * ((t - w) + mbs * w)
    return total


def amp_step_s(root: Path, trial: AmpTrial, global_batch: int = 32, hidden: int = 1024, seq: int = 1024) -> float:
    """AMP's het_cluster: nodes 0-2 are 4x V100 (10 Gbit/s out, 170 in), node 3 is 4x T4 (50/50).

    Ranks are laid out model-parallel fastest, then data, then pipeline (DeepSpeed's topology),
    four ranks per node. Per-stage compute from `amp_layer_s`; the pipeline (Alloy's 1F1B) and the
    per-stage gradient all-reduce among the stage's replicas on their slowest link are as for Sailor,
    with fp32 on the wire (AMP's convention) and stage 0 also reducing the token + position embedding.
    What crosses a node's network card at the same time shares it (`_nic_streams`):
    - pipeline sends: DeepSpeed's pipeline engine partitions a stage's output over the model-parallel
      ranks (`is_pipe_partitioned` when mp > 1), so each rank sends 1/mp of it, and the replicas run
      in lockstep: the node's card carries every replica's send that leaves the node;
    - gradient all-reduce: each model-parallel rank has its own data-parallel group, all reducing at
      once; a ring that spans nodes crosses each node's card once per group with members there.
    """
    cluster = json.loads((root / "AMP/derived/clusters.json").read_text())["het_cluster"]["nodes"]
    fwd = amp_forward_s(root)
    node_of = lambda rank: rank // 4  # noqa: E731
    gpu_of = lambda rank: cluster[node_of(rank)]["gpu"]  # noqa: E731
    intra_Bps = lambda rank: cluster[node_of(rank)]["intra_node_gbit_s"] * 1e9 / 8  # noqa: E731

    def link_Bps(a: int, b: int) -> float:
        if node_of(a) == node_of(b):
            return intra_Bps(a)
        return min(cluster[node_of(a)]["inter_node_gbit_s"], cluster[node_of(b)]["inter_node_gbit_s"]) * 1e9 / 8

    micro_batches = max(1, global_batch // (trial.mbs * trial.dp))
    act_bytes = trial.mbs * seq * hidden * AMP_WIRE_BYTES
    ranks = lambda s, d: [s * trial.dp * trial.mp + d * trial.mp + m for m in range(trial.mp)]  # noqa: E731
    pipelines = []
    for d in range(trial.dp):
        slots = []
        for s in range(trial.pp):
            lo, hi = trial.boundaries[s], trial.boundaries[s + 1]
            compute = max(amp_layer_s(fwd, gpu_of(r), trial.mp, lo, hi, trial.mbs, intra_Bps(r), seq, hidden)
                          for r in ranks(s, d))
            send = 0.0
            if s + 1 < trial.pp:
                a, b = ranks(s, d)[0], ranks(s + 1, d)[0]
                leaving = [(ranks(s, e)[m], ranks(s + 1, e)[m]) for e in range(trial.dp) for m in range(trial.mp)]
                send = 2 * act_bytes / trial.mp / (link_Bps(a, b) / _nic_streams(node_of, a, b, leaving))
            slots.append(compute + send)
        pipelines.append(pipeline_time_s(slots, micro_batches))
    sync = 0.0
    layer_params = 12 * hidden * hidden  # one transformer layer
    for s in range(trial.pp):
        if trial.dp < 2:
            break
        lo, hi = trial.boundaries[s], trial.boundaries[s + 1]
        params = sum(1 for i in range(lo, hi) if 2 <= i < AMP_SLOTS - 4) * layer_params
        if lo == 0:
            params += (AMP_VOCAB + seq) * hidden
        group = [ranks(s, d)[0] for d in range(trial.dp)]
        bw = min(link_Bps(a, b) for i, a in enumerate(group) for b in group[i + 1:])
        nodes = {node_of(r) for r in group}
        if len(nodes) > 1:  # the mp groups of this stage reduce at once over the same cards
            bw /= max(len({m for d in range(trial.dp) for m in range(trial.mp) if node_of(ranks(s, d)[m]) == n})
                      for n in nodes)
        sync = max(sync, 2 * (trial.dp - 1) / trial.dp * params / trial.mp * AMP_WIRE_BYTES / bw)
    return max(pipelines) + sync


def _nic_streams(node_of, a: int, b: int, transfers: list[tuple[int, int]]) -> int:
    """How many of the simultaneous `transfers` (src rank, dst rank) leave a's node, if a -> b leaves it."""
    if node_of(a) == node_of(b):
        return 1
    return max(1, sum(1 for src, dst in transfers if node_of(src) == node_of(a) and node_of(dst) != node_of(src)))
