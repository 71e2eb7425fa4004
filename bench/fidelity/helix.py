"""Importers for the Helix (ASPLOS'25) artifact: cluster INI, machine profiles, per-layer CSVs, placements.

- `read_cluster(path)` -> HelixCluster: compute nodes (index -> machine type) and links.
- `read_machine_profiles(path)` -> {type: {vram_bytes, nic_bytes_per_s, ...}}.
- `read_layer_csv(path)` -> (batch, ms) rows of one transformer layer (vLLM, fp16);
  `read_layer_csv_resolution(path)` -> each row's print resolution (whole ms for large times).
- `read_solution(path)` -> {node index: (first layer, stop layer)}.
- `route_table(lines)` / `read_routes(path, run)` -> the routes a prototype run's requests took
  (`query_route.txt`), each with its share of the generated tokens.
- `helix_inventory(...)` -> an Alloy `Inventory`: one device per compute node, carrying the node's
  measured per-layer profiles (`layer_times`); a "T4x4"-style VM is one device, its rates the group's.

Unit caveat (see the data README): Helix's helpers say `mbps = 1e6`, `gbps = 1e9` and its simulator
divides *bytes* by them, so a link of `1000 * mbps` is 1e9 bytes/s here too.
"""

from __future__ import annotations

import ast
import configparser
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from alloy.devices import DeviceProfile, Inventory, Link, LinkSpec
from alloy.devices.schema import MeasuredLayerTimes
from alloy.errors import ConfigError

UNITS = {"mbps": 1e6, "gbps": 1e9, "kbps": 1e3, "GB": 1e9, "MB": 1e6, "MilliSec": 1e-3, "Sec": 1.0}
MODEL_DIRS = {"llama70b": "llama2_70b", "llama30b": "llama1_30b"}


def parse_quantity(text: str) -> float:
    """'1000 * mbps' -> 1e9; '-1' -> -1.0. Only numbers, '*' and the unit names above."""
    value = 1.0
    for factor in text.split("*"):
        factor = factor.strip()
        if factor in UNITS:
            value *= UNITS[factor]
        else:
            try:
                value *= float(factor)
            except ValueError:
                raise ConfigError(f"cannot read quantity {text!r} (unknown unit {factor!r})") from None
    return value


def _ini(path: Path) -> configparser.ConfigParser:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    parser = configparser.ConfigParser()
    parser.optionxform = str  # keep key case
    parser.read(path)
    return parser


@dataclass(frozen=True)
class HelixCluster:
    node_types: dict[int, str]  # compute node index -> machine type ("A100", "T4x4", ...)
    links: dict[tuple[str, str], tuple[float, float]]  # (a, b) -> (bytes/s, latency s); a, b: "3", "source"


def read_cluster(path: str | Path) -> HelixCluster:
    ini = _ini(Path(path))
    types, links = {}, {}
    for section in ini.sections():
        if m := re.fullmatch(r"ComputeNode-(\d+)", section):
            types[int(m.group(1))] = ini[section]["type"]
        elif m := re.fullmatch(r"Link-(\w+)-(\w+)", section):
            links[(m.group(1), m.group(2))] = (parse_quantity(ini[section]["bandwidth"]),
                                               parse_quantity(ini[section]["latency"]))
    if not types:
        raise ConfigError(f"{path}: no [ComputeNode-i] sections")
    return HelixCluster(types, links)


def read_machine_profiles(path: str | Path) -> dict[str, dict[str, float]]:
    ini = _ini(Path(path))
    return {s: {k: parse_quantity(v) for k, v in ini[s].items()} for s in ini.sections()}


def read_layer_csv(path: str | Path) -> tuple[list[float], list[float]]:
    """(batch, milliseconds) rows with batch > 0, sorted, duplicates dropped."""
    rows = {}
    for line in Path(path).read_text().split():
        batch, ms = (float(x) for x in line.split(","))
        if batch > 0:
            rows.setdefault(batch, ms)
    batch = sorted(rows)
    return batch, [rows[b] for b in batch]


def read_layer_csv_resolution(path: str | Path) -> dict[float, float]:
    """{batch: resolution in ms} of each row: the step of its printed time (`8` -> 1 ms, `1.4` -> 0.1 ms).

    The profiles print large times in whole milliseconds, so a row reading 8 ms means 7.5-8.5 ms."""
    out = {}
    for line in Path(path).read_text().split():
        batch, ms = line.split(",")
        decimals = len(ms.split(".")[1]) if "." in ms else 0
        out.setdefault(float(batch), 10.0 ** -decimals)
    return out


def read_solution(path: str | Path) -> dict[int, tuple[int, int]]:
    """{compute node index: (first layer, stop layer)}; layers are contiguous in every file here."""
    ini = _ini(Path(path))
    offset = int(ini["Settings"].get("offset", "0")) if ini.has_section("Settings") else 0
    placement = {}
    for key, value in ini["Solution"].items():
        layers = sorted(ast.literal_eval(value))
        if layers != list(range(layers[0], layers[-1] + 1)):
            raise ConfigError(f"{path}: {key} holds non-contiguous layers {layers}")
        placement[int(key.rsplit("_", 1)[1]) - offset] = (layers[0], layers[-1] + 1)
    return placement


def gpus_in(machine_type: str) -> tuple[str, int]:
    """'T4x4' -> ('T4', 4); 'A100' -> ('A100', 1)."""
    m = re.fullmatch(r"(\w+?)x(\d+)", machine_type)
    return (m.group(1), int(m.group(2))) if m else (machine_type, 1)


def layer_profiles(root: Path, machine_type: str, specs: dict[str, object]) -> list[MeasuredLayerTimes]:
    """The measured prefill and decode per-layer profiles of one machine type, for each model."""
    out = []
    for name, spec in specs.items():
        folder = root / "Helix-ASPLOS25/simulator/model_manager" / MODEL_DIRS[name] / machine_type.lower()
        for phase, file in (("prefill", "prompt_bs2time.csv"), ("decode", "decode_bs2time.csv")):
            batch, ms = read_layer_csv(folder / file)
            out.append(MeasuredLayerTimes(model=name, hidden_size=spec.hidden_size, num_layers=spec.num_layers,
                                          phase=phase, batch=batch, layer_s=[t / 1e3 for t in ms],
                                          source=str(folder.relative_to(root) / file)))
    return out


def helix_inventory(root: Path, cluster_file: str | Path, machine_file: str | Path, specs: dict[str, object],
                    rates: dict[str, tuple[float, float]]) -> Inventory:
    """An Alloy inventory for a Helix cluster: device `n<i>` per compute node, links as declared.

    `rates` gives each machine type's (FLOP/s, bytes/s) — the fitted roofline of `layer_time` —
    so the planner's heuristics can rank devices; the cost model itself reads `layer_times`.
    """
    cluster, machines = read_cluster(cluster_file), read_machine_profiles(machine_file)
    devices = []
    for i, machine_type in sorted(cluster.node_types.items()):
        if machine_type not in machines:
            raise ConfigError(f"{machine_file}: no profile for machine type {machine_type!r}")
        flops, bandwidth = rates[machine_type]
        devices.append(DeviceProfile(
            name=f"n{i}", kind="cuda", model=machine_type, node=f"vm{i}",
            memory_bytes=int(machines[machine_type]["vram_size"]), matmul_flops={"fp16": flops},
            memory_bandwidth_bytes_per_s=bandwidth,
            layer_times=layer_profiles(root, machine_type, specs)))
    links = [Link(a=f"n{a}", b=f"n{b}", bandwidth_bytes_per_s=bw, latency_s=lat)
             for (a, b), (bw, lat) in cluster.links.items() if a.isdigit() and b.isdigit()]
    nic = min(m["outbound_nic_speed"] for m in machines.values() if m.get("outbound_nic_speed", -1) > 0)
    return Inventory(name=Path(cluster_file).stem, devices=devices, links=links,
                     inter_node_link=LinkSpec(bandwidth_bytes_per_s=nic, latency_s=1e-3))


def _route_key(nodes, starts, ends) -> str:
    return " ".join(f"{n}:{a}-{b}" for n, a, b in zip(nodes, starts, ends) if n != 0)


def route_table(lines) -> list[dict]:
    """Aggregate the lines of a Helix `query_route.txt` — `(id, input, output, [machine ids], [starts],
    [ends])`, the host (machine 0) last — into one row per distinct route: its stages as
    "machine:first-stop ...", the queries that took it and their input and output tokens."""
    rows: dict[str, dict] = {}
    for line in lines:
        if not line.strip():
            continue
        try:
            _, prompt, output, nodes, starts, ends = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError) as e:
            raise ConfigError(f"not a query_route line: {line.strip()[:80]!r}") from e
        row = rows.setdefault(_route_key(nodes, starts, ends), {"queries": 0, "input_tokens": 0, "output_tokens": 0})
        row["queries"] += 1
        row["input_tokens"] += prompt
        row["output_tokens"] += output
    return [{"stages": k, **v} for k, v in sorted(rows.items(), key=lambda kv: -kv[1]["output_tokens"])]


@functools.lru_cache(maxsize=4)
def _route_file(path: Path) -> dict:
    return json.loads(path.read_text())


def read_routes(path: str | Path, run: str) -> dict[tuple[tuple[str, int, int], ...], float]:
    """One run's routes from a route-table JSON ({run: {"routes": [route_table rows], ...}}): each route as
    ((device name, first, stop), ...) -> its share of the generated tokens. Machine m is compute node
    m - 1, the device `n{m-1}` of `helix_inventory` (machine 0 is the host)."""
    data = _route_file(Path(path))
    if run not in data:
        raise ConfigError(f"no routes for run {run!r} in {path}")
    out, total = {}, sum(r["output_tokens"] for r in data[run]["routes"])
    for r in data[run]["routes"]:
        stages = []
        for stage in r["stages"].split():
            machine, span = stage.split(":")
            a, b = span.split("-")
            stages.append((f"n{int(machine) - 1}", int(a), int(b)))
        out[tuple(stages)] = r["output_tokens"] / total
    return out
