"""Merge same-spec models (e.g. fine-tunes of one base made on different machines) into one.

Methods, over each floating-point tensor, computed in fp32 and stored in the first model's dtype:
    linear            sum_i w_i x_i, weights normalised to sum 1 (default: equal)
    task-arithmetic   base + sum_i w_i (x_i - base)  (Ilharco et al. 2023; default w_i = 1)
    ties              base + sum of the trimmed task vectors that agree with the elected sign,
                      divided by their weight (Yadav et al. 2023, "TIES-Merging"); `density` is
                      the fraction of each task vector's largest-magnitude entries kept
    slerp             spherical interpolation of two models at `t` (0 gives the first, 1 the second)
Streaming: tensor by tensor, one output file per file of the first model, so memory stays near
one output file plus one tensor per input. Nothing is merged unless every model has the same
spec (the first differing knob is named) and the same tensors with the same shapes, nor unless
they share one tokenizer or `tokenizer` names the model whose tokenizer to keep.
"""

from __future__ import annotations

import json
import math
import shutil
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from alloy.checkpoint.io import SIDE_FILES, TOKENIZER_FILES, check_output_dir, staged_dir
from alloy.errors import CheckpointError, ConfigError
from alloy.spec import ModelSpec, read_config

METHODS = ("linear", "task-arithmetic", "ties", "slerp")
# The files that define how text becomes ids: models that differ in one tokenize differently.
VOCAB_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt")


def _files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no weights (*.safetensors) found")
    return files


class _Tensors:
    """Lazy name -> tensor access over one model directory's safetensors files."""

    def __init__(self, directory: Path, stack: ExitStack):
        self.directory = directory
        self.where: dict[str, object] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.files: list[tuple[Path, list[str]]] = []
        for path in _files(directory):
            try:
                handle = stack.enter_context(safe_open(str(path), framework="pt"))
            except Exception as err:
                raise CheckpointError(f"{path}: not a readable safetensors file ({' '.join(str(err).split())[:200]})") from None
            names = list(handle.keys())
            self.files.append((path, names))
            for name in names:
                self.where[name] = handle
                self.shapes[name] = tuple(handle.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self.where[name].get_tensor(name)


def first_spec_difference(a: ModelSpec, b: ModelSpec) -> str | None:
    """The first knob (in ModelSpec order) whose value differs, as 'knob: A vs B', or None."""
    da, db = a.to_dict(), b.to_dict()
    for knob, value in da.items():
        if db.get(knob) != value:
            return f"{knob}: {value!r} vs {db.get(knob)!r}"
    return None


def merge(models: list[str | Path], out: str | Path, *, method: str = "linear", weights: list[float] | None = None,
          base: str | Path | None = None, t: float = 0.5, density: float = 1.0, tokenizer: str | Path | None = None,
          overwrite: bool = False) -> Path:
    """Merge the HF directories `models` (and `base`, for task-arithmetic and ties) into `out`.
    The tokenizer is theirs if they share one, else that of `tokenizer` (one of them); a previous
    model at `out` is replaced only with `overwrite`."""
    dirs = [Path(m) for m in models]
    _check_arguments(dirs, method, weights, base, t, density)
    base_dir = Path(base) if base is not None else None
    every = dirs + ([base_dir] if base_dir is not None else [])
    target = check_output_dir(out, overwrite=overwrite, inputs=every)
    specs = [ModelSpec.from_hf_config(read_config(d / "config.json")) for d in every]
    for d, spec in zip(every[1:], specs[1:]):
        diff = first_spec_difference(specs[0], spec)
        if diff:
            raise ConfigError(f"cannot merge models with different specs: {dirs[0]} and {d} differ in {diff}")
    tokenizer_dir = _tokenizer_source(every, tokenizer)
    with staged_dir(target) as staging, ExitStack() as stack:
        sources = [_Tensors(d, stack) for d in every]
        _check_same_tensors(sources)
        combine = _method(method, weights, t, density, len(dirs))
        weight_map, total = {}, 0
        for path, names in sources[0].files:
            merged = {}
            for name in names:
                tensors = [s.get(name) for s in sources]
                merged[name] = _merge_one(name, tensors, combine, base_dir is not None)
                total += merged[name].numel() * merged[name].element_size()
            save_file(merged, str(staging / path.name), metadata={"format": "pt"})
            weight_map.update({name: path.name for name in merged})
            del merged
        if len(sources[0].files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        shutil.copy(dirs[0] / "config.json", staging / "config.json")
        for name in SIDE_FILES:
            source = tokenizer_dir if name in TOKENIZER_FILES else dirs[0]
            if (source / name).is_file():
                shutil.copy(source / name, staging / name)
        (staging / "merge.json").write_text(json.dumps({
            "method": method, "models": [str(d) for d in dirs], "base": str(base_dir) if base_dir else None,
            "weights": weights, "t": t if method == "slerp" else None,
            "density": density if method == "ties" else None,
            "tokenizer": str(tokenizer_dir)}, indent=1) + "\n")
    return target


def _tokenizer_source(every: list[Path], chosen: str | Path | None) -> Path:
    """The model whose tokenizer files the merge keeps: `chosen`, which must be one of the
    inputs, or else the first — and then every input must tokenize the same way."""
    if chosen is not None:
        for d in every:
            if d.resolve() == Path(chosen).resolve():
                return d
        raise ConfigError(f"--tokenizer {chosen} is not one of the merged models; name the one whose "
                          "tokenizer to keep")
    first = _vocab(every[0])
    for d in every[1:]:
        theirs = _vocab(d)
        differ = sorted(name for name in set(first) | set(theirs) if first.get(name) != theirs.get(name))
        if differ:
            raise ConfigError(f"cannot merge: {every[0]} and {d} have different tokenizers ({', '.join(differ)} "
                              "differ); choose the one to keep with --tokenizer MODEL (tokenizer= in Python)")
    return every[0]


def _vocab(directory: Path) -> dict[str, object]:
    """The model's vocabulary files, JSON ones parsed (so that formatting does not count)."""
    found = {}
    for name in VOCAB_FILES:
        path = directory / name
        if path.is_file():
            try:
                found[name] = json.loads(path.read_bytes()) if name.endswith(".json") else path.read_bytes()
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ConfigError(f"{path}: not valid JSON ({err})") from None
    return found


def _check_arguments(dirs, method, weights, base, t, density) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown merge method {method!r}; choose from {', '.join(METHODS)}")
    if not dirs:
        raise ConfigError("merge needs at least one model")
    if method in ("task-arithmetic", "ties") and base is None:
        raise ConfigError(f"{method} merges differences from a base model: give --base")
    if method in ("linear", "slerp") and base is not None:
        raise ConfigError(f"{method} takes no base model")
    if method == "slerp" and len(dirs) != 2:
        raise ConfigError(f"slerp interpolates exactly two models; got {len(dirs)}")
    if weights is not None and len(weights) != len(dirs):
        raise ConfigError(f"{len(weights)} weights for {len(dirs)} models")
    if method == "linear" and weights is not None and sum(weights) == 0:
        raise ConfigError("linear merge weights sum to 0")
    if not 0.0 <= t <= 1.0:
        raise ConfigError(f"slerp t={t} must be in [0, 1]")
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"ties density={density} must be in (0, 1]")


def _check_same_tensors(sources: list[_Tensors]) -> None:
    first = sources[0]
    for other in sources[1:]:
        for name in sorted(set(first.shapes) | set(other.shapes)):
            if name not in other.shapes:
                raise ConfigError(f"cannot merge: {other.directory} has no tensor {name!r} (in {first.directory})")
            if name not in first.shapes:
                raise ConfigError(f"cannot merge: {first.directory} has no tensor {name!r} (in {other.directory})")
            if first.shapes[name] != other.shapes[name]:
                raise ConfigError(f"cannot merge: tensor {name!r} has shape {list(first.shapes[name])} in "
                                  f"{first.directory} but {list(other.shapes[name])} in {other.directory}")


def _merge_one(name: str, tensors: list[torch.Tensor], combine, has_base: bool) -> torch.Tensor:
    dtype = tensors[0].dtype
    if not dtype.is_floating_point:  # integer buffers (ids, counters) must agree; they are not averaged
        if any(not torch.equal(x, tensors[0]) for x in tensors[1:]):
            raise ConfigError(f"cannot merge: non-float tensor {name!r} differs between models")
        return tensors[0]
    values = [x.float() for x in tensors]
    if has_base:
        *models, base = values
        return combine(models, base).to(dtype).contiguous()
    return combine(values, None).to(dtype).contiguous()


def _method(method: str, weights, t: float, density: float, n: int):
    if method == "linear":
        w = weights or [1.0] * n
        w = [x / sum(w) for x in w]
        return lambda xs, _: sum(wi * x for wi, x in zip(w, xs))
    if method == "task-arithmetic":
        w = weights or [1.0] * n
        return lambda xs, base: base + sum(wi * (x - base) for wi, x in zip(w, xs))
    if method == "ties":
        w = weights or [1.0] * n
        return lambda xs, base: ties(xs, base, w, density)
    return lambda xs, _: slerp(xs[0], xs[1], t)


def ties(models: list[torch.Tensor], base: torch.Tensor, weights: list[float], density: float) -> torch.Tensor:
    """TIES: trim each task vector to its top-`density` entries by magnitude, elect each entry's
    sign by the summed (weighted) trimmed values, and average only the values with that sign."""
    deltas = torch.stack([w * _trim(x - base, density) for w, x in zip(weights, models)])  # [n, ...]
    sign = torch.sign(deltas.sum(dim=0))
    agree = (torch.sign(deltas) == sign) & (deltas != 0)
    kept = (deltas * agree).sum(dim=0)
    weight = (torch.tensor(weights).reshape(-1, *[1] * base.ndim) * agree).sum(dim=0)
    return base + torch.where(weight > 0, kept / weight.clamp(min=1e-12), torch.zeros_like(kept))


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1.0 or delta.numel() == 0:
        return delta
    k = max(1, int(round(density * delta.numel())))
    threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation between the flattened tensors; linear when nearly parallel."""
    dot = (a.flatten().double() @ b.flatten().double()) / (a.double().norm() * b.double().norm()).clamp(min=eps)
    dot = float(dot.clamp(-1.0, 1.0))
    if abs(dot) > 1 - 1e-6:  # (anti)parallel: the sphere's arc is a line
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    # Coefficients first, so t=0 gives exactly a (1.0 * a + 0.0 * b) and t=1 exactly b.
    return (math.sin((1 - t) * theta) / math.sin(theta)) * a + (math.sin(t * theta) / math.sin(theta)) * b
