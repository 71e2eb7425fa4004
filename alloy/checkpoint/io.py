"""Hugging Face directories in and out: config.json + (sharded) safetensors + tokenizer files.

Safetensors only: nothing here ever unpickles. Every source tensor is consumed by a rule or
explicitly ignored, every parameter is filled, every shape checked; otherwise one
CheckpointError names the difference.
"""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from alloy.checkpoint.keymap import HEAD_KEYS, IDENTITY, LAYOUTS, Layout, Rule
from alloy.errors import CheckpointError, ConfigError
from alloy.model import Transformer
from alloy.model.layers import rope_inv_freq
from alloy.spec import ModelSpec, read_config

# Files beside the weights that describe the tokenizer and generation; copied through on save.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "vocab.txt", "vocab.json", "merges.txt", "chat_template.jinja",
)
# Those that say how text becomes ids and how a chat prompt is rendered: they travel with the
# tokenizer (a fine-tune's or a merge's chosen one), where generation_config.json stays the model's.
TOKENIZER_FILES = tuple(name for name in SIDE_FILES if name != "generation_config.json")
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
MAX_SHARD_BYTES = 2 * 1024**3
# What a model folder holds (besides model*.safetensors); a folder of only these may be replaced.
MODEL_FILES = frozenset({"config.json", "model.safetensors.index.json", "merge.json", *SIDE_FILES})
_LIST_AT_MOST = 5  # names shown in an error before "... and N more"


def torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A weights dtype by name ("bf16", "bfloat16", ...) as a torch.dtype; a torch.dtype or None passes through."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _names(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_LIST_AT_MOST])
    return shown + (f" ... and {len(keys) - _LIST_AT_MOST} more" if len(keys) > _LIST_AT_MOST else "")


def _weight_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise CheckpointError(
            f"{directory}: only pickled weights ({_names(pickled)}); Alloy reads safetensors only "
            "— re-save them with safetensors"
        )
    raise CheckpointError(f"{directory}: no weights (*.safetensors) found")


# A stored dtype a weight may be read row by row in (StoredRows): the floats a checkpoint holds.
_ROW_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _safetensors_header(path: Path) -> tuple[int, dict]:
    """(the file offset its tensors' data starts at, its header): a safetensors file opens with
    the header's length (8 bytes, little-endian), then the header, JSON {name: {dtype, shape,
    data_offsets: [begin, end) from the data's start}}."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return 8 + length, json.loads(f.read(length))


class StoredRows:
    """A 2-D float tensor of a safetensors file, read a range of rows at a time (`weight[a:b]`,
    a new tensor each read) with plain file reads: nothing of it is held between reads, and nothing
    memory-mapped (a mapped file's pages count in the process's RSS for as long as the map lives).
    What `fill` leaves in place of a weight asked for as rows, for alloy.quant.quantize to quantize
    a chunk at a time: the float weight is never whole in memory. `dtype`: what the rows are
    converted to (as `fill` converts a tensor); the stored dtype by default."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, int], stored: torch.dtype,
                 dtype: torch.dtype | None = None):
        self.path, self.offset, self.shape = path, offset, torch.Size(shape)
        self.stored, self.dtype = stored, dtype or stored

    def dim(self) -> int:
        return 2

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"StoredRows reads a range of rows (weight[a:b]), not {rows!r}")
        start, stop, _ = rows.indices(self.shape[0])
        out = torch.empty(max(0, stop - start), self.shape[1], dtype=self.stored)
        buffer = memoryview(out.view(torch.uint8).numpy()).cast("B")
        row_bytes = self.shape[1] * out.element_size()
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset + start * row_bytes)
            done = 0
            while done < len(buffer):
                n = f.readinto(buffer[done:])
                if not n:
                    raise CheckpointError(f"{self.path}: ends inside a tensor's data (truncated?)")
                done += n
        return out if self.dtype == self.stored else out.to(self.dtype)


class StackedRows:
    """Weights [out_i, in] (StoredRows, or tensors) one after another as one [sum out_i, in]:
    `[a:b]` reads those rows from the parts they fall in, in the first part's dtype (as torch.cat
    into a fused nn.Linear would give them). What alloy.infer.optimize fuses q/k/v and gate/up into
    while their rows are still on disk: the fused float weight never exists."""

    def __init__(self, parts: list):
        self.parts, self.dtype = parts, parts[0].dtype
        self.shape = torch.Size((sum(part.shape[0] for part in parts), parts[0].shape[1]))

    def dim(self) -> int:
        return 2

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.shape[0])
        pieces, offset = [], 0
        for part in self.parts:
            a, b = max(start - offset, 0), min(stop - offset, part.shape[0])
            if a < b:
                pieces.append(part[a:b].to(self.dtype))
            offset += part.shape[0]
        if not pieces:
            return torch.empty(0, self.shape[1], dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class _Source:
    """Lazy access to every tensor in a directory's safetensors files, by canonical name."""

    def __init__(self, directory: Path, layout: Layout):
        self.headers: dict[Path, tuple[int, dict]] = {}  # parsed when a tensor is asked for as rows
        self.handles = {}
        self.where: dict[str, tuple[Path, str]] = {}  # canonical name -> (file, stored name)
        for path in _weight_files(directory):
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as err:  # safetensors raises its own error types for corrupt files
                raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(err)})") from None
            self.handles[path] = handle
            for stored in handle.keys():
                name = _strip_prefix(stored, layout)
                if name in self.where:
                    raise CheckpointError(f"{directory}: tensor {stored!r} appears in two files")
                self.where[name] = (path, stored)

    def get(self, name: str) -> torch.Tensor:
        path, stored = self.where[name]
        try:
            return self.handles[path].get_tensor(stored)
        except Exception as err:
            raise CheckpointError(f"{path}: cannot read tensor {stored!r} ({_one_line(err)})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        path, stored = self.where[name]
        return tuple(self.handles[path].get_slice(stored).get_shape())

    def rows(self, name: str, dtype: torch.dtype | None = None) -> StoredRows | None:
        """`name` to be read a range of rows at a time (StoredRows), or None where it is not a 2-D
        float tensor (then read it whole with `get`)."""
        path, stored = self.where[name]
        if path not in self.headers:
            self.headers[path] = _safetensors_header(path)
        data_start, header = self.headers[path]
        entry = header.get(stored, {})
        shape, stored_dtype = entry.get("shape", ()), _ROW_DTYPES.get(entry.get("dtype"))
        if len(shape) != 2 or stored_dtype is None:
            return None
        begin, end = entry["data_offsets"]
        if end - begin != shape[0] * shape[1] * stored_dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {stored!r} holds {end - begin} bytes, not its shape's "
                                  f"{shape} of {entry['dtype']}")
        return StoredRows(path, data_start + begin, tuple(shape), stored_dtype, dtype)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:200]


def _strip_prefix(key: str, layout: Layout) -> str:
    for prefix in layout.load_prefixes:
        if prefix and key.startswith(prefix):
            return key[len(prefix):]
    return key


def load(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    layers: tuple[int, int] | None = None,
    embed: bool | None = None,
    head: bool | None = None,
) -> Transformer:
    """Read a model into a Transformer, or just a pipeline stage of it: layers [a, b) with or
    without the embeddings and head (by default: with them when the range touches that end).
    Only the stage's own tensors are read. `path` is an HF directory, a GGUF file (or a folder
    holding one), or a hub id `org/name[@revision]` already in the local Hugging Face cache."""
    return open_model(path)(device, dtype, layers=layers, embed=embed, head=head)


def open_model(path: str | Path):
    """`load` bound to one model: the files opened, the tensor index built and checked and the
    tokenizer read once; each call reads only its stage's tensors. For building a model piece by
    piece (alloy.infer.load), where reopening per layer would parse a GGUF's metadata or a large
    tokenizer.json once per layer."""
    from alloy.checkpoint.gguf_in import find_gguf, open_gguf_model
    from alloy.checkpoint.hub import resolve_model

    directory = resolve_model(path)
    gguf_file = find_gguf(directory)
    if gguf_file is not None:
        return open_gguf_model(gguf_file)
    if directory.is_file():  # a config.json or weights file inside the model directory
        directory = directory.parent
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    spec = ModelSpec.from_hf_config(read_config(directory / "config.json"))
    layout = LAYOUTS[spec.family]
    source = _Source(directory, layout)
    rules = layout.expand(spec)
    _check_accounted(source, rules, layout, spec, directory)
    side_files = read_side_files(directory)
    tokenizer = _read_tokenizer(directory, side_files)

    def read(device=None, dtype=None, *, layers=None, embed=None, head=None, stand_ins=None,
             rows=()) -> Transformer:
        # the files mapped again per call (their headers only): a map held across the pieces would
        # keep every page read so far resident, as much as the checkpoint by the last layer
        model = fill(spec, rules, _Source(directory, layout), directory, device, dtype, layers=layers,
                     embed=embed, head=head, stand_ins=stand_ins, rows=rows)
        model.side_files, model.tokenizer = side_files, tokenizer
        return model.eval()

    read.spec = spec
    read.reads_rows = True  # takes `rows` (fill's); a GGUF file's reader does not
    return read


def fill(spec: ModelSpec, rules: list[Rule], source, where: str | Path, device, dtype, *,
         layers=None, embed=None, head=None, stand_ins: dict[str, torch.nn.Module] | None = None,
         rows: Collection[str] = ()) -> Transformer:
    """A Transformer (or stage) whose parameters are `rules` applied to `source`'s tensors: any
    object with `get(name)` and `shape(name)` (a folder's safetensors, a GGUF file). Each
    parameter filled once, each shape checked; `where` names the source in errors.

    `stand_ins` {module name: module} take those modules' places before anything is read, so their
    tensors are never read nor held (a stage whose experts run on another rank:
    alloy.infer.distributed); names outside this slice are ignored, a stand-in's own tensors kept.

    `rows`: names of 2-D weights to leave on disk, each module's attribute a StoredRows (rows read
    on demand) in place of its parameter, where the source reads rows (`source.rows`) and the
    rule takes the tensor as stored; others are read as usual. For quantizing a weight a few rows
    at a time (alloy.infer.load): such a model is only for that, not for running."""
    target_dtype = torch_dtype(dtype)
    with torch.device("meta"):
        model = Transformer(spec, layers, embed=embed, head=head)
    present = dict(model.named_modules())
    swapped = [name for name in stand_ins or {} if name and name in present]
    for name in swapped:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, stand_ins[name])
    wanted = dict(model.state_dict())
    own = {name: t for name, t in wanted.items() if name.startswith(tuple(f"{s}." for s in swapped))}
    wanted = {name: t for name, t in wanted.items() if name not in own}
    rules = list(rules)
    if "head.weight" in wanted and spec.tie_embeddings:  # a head-only slice of a tied model
        embed_rule = next(r for r in rules if r.ours == ("embed.tok.weight",))
        rules.append(Rule(embed_rule.hf, ("head.weight",), embed_rule.transform))

    state: dict[str, torch.Tensor] = {}
    on_disk: dict[str, StoredRows] = {}
    for rule in rules:
        if not any(name in wanted for name in rule.ours):
            continue  # belongs to layers outside this slice
        if (len(rule.ours) == 1 and rule.ours[0] in rows and rule.ours[0] in wanted and rule.transform is IDENTITY
                and hasattr(source, "rows")):
            stored = source.rows(rule.hf[0], target_dtype)
            if stored is not None:
                if tuple(stored.shape) != tuple(wanted[rule.ours[0]].shape):
                    raise CheckpointError(f"{where}: tensor {rule.hf[0]!r} has shape {list(stored.shape)}; the "
                                          f"config implies {list(wanted[rule.ours[0]].shape)} for {rule.ours[0]}")
                on_disk[rule.ours[0]] = stored
                continue
        try:
            tensors = rule.transform.load([source.get(name) for name in rule.hf], spec)
        except RuntimeError:  # a fused tensor whose size does not split as the config says
            raise CheckpointError(
                f"{where}: tensor {rule.hf[0]!r} has shape {list(source.shape(rule.hf[0]))}, "
                f"which does not match the config"
            ) from None
        for name, tensor in zip(rule.ours, tensors):
            if name not in wanted:  # a fused tensor split between a module and a stand-in
                continue
            expected = tuple(wanted[name].shape)
            if tuple(tensor.shape) != expected:
                raise CheckpointError(
                    f"{where}: tensor {rule.hf[0]!r} has shape {list(source.shape(rule.hf[0]))}; "
                    f"the config implies {list(expected)} for {name}"
                )
            tensor = tensor.to(device=device or "cpu", dtype=target_dtype or tensor.dtype)
            state[name] = tensor.contiguous()
    missing = set(wanted) - set(state) - set(on_disk)
    if missing:
        raise CheckpointError(f"{where}: no tensor for {_names(missing)}")
    model.load_state_dict(state | own | {name: wanted[name] for name in on_disk}, strict=True, assign=True)
    for name, stored in on_disk.items():  # the meta parameter out, the rows on disk in its place
        module, _, attribute = name.rpartition(".")
        delattr(model.get_submodule(module), attribute)
        setattr(model.get_submodule(module), attribute, stored)
    if spec.positions == "rope":  # non-persistent buffer: recompute off the meta device
        model.inv_freq = rope_inv_freq(spec).to(device or "cpu")
    return model


def _check_accounted(source: _Source, rules: list[Rule], layout: Layout, spec: ModelSpec, directory: Path):
    needed = {name for rule in rules for name in rule.hf}
    missing = needed - set(source.where)
    extra = {
        name for name in set(source.where) - needed
        if not layout.ignored(name) and not (spec.tie_embeddings and name in HEAD_KEYS)
    }
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {_names(missing)}")
        if extra:
            parts.append(f"unexpected {_names(extra)}")
        raise CheckpointError(f"{directory}: weights do not match the {spec.family} config: {'; '.join(parts)}")


def read_side_files(directory: str | Path) -> dict[str, bytes]:
    """The SIDE_FILES a model folder holds, name -> bytes."""
    directory = Path(directory)
    return {name: (directory / name).read_bytes() for name in SIDE_FILES if (directory / name).is_file()}


def chat_template(model) -> str | None:
    """The model's chat template: chat_template.jinja (newer transformers) or tokenizer_config.json's."""
    files = getattr(model, "side_files", {})
    if files.get("chat_template.jinja"):
        return files["chat_template.jinja"].decode()
    raw = files.get("tokenizer_config.json")
    template = json.loads(raw).get("chat_template") if raw else None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template or None


def _read_tokenizer(directory: Path, side: dict[str, bytes]):
    if "tokenizer.json" not in side:
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(side["tokenizer.json"].decode())
    except Exception as err:
        raise CheckpointError(f"{directory}/tokenizer.json: unreadable ({_one_line(err)})") from None


def hf_tensors(spec: ModelSpec, state: dict[str, torch.Tensor], *, partial: bool = False) -> dict[str, torch.Tensor]:
    """Alloy tensors -> the family's HF names and layout. With `partial`, rules whose tensors are
    not all in `state` are skipped (a pipeline stage's shard); otherwise each must be there."""
    layout = LAYOUTS[spec.family]
    out: dict[str, torch.Tensor] = {}
    for rule in layout.expand(spec):
        if partial and not all(name in state for name in rule.ours):
            continue
        for name, tensor in zip(rule.hf, rule.transform.save([state[n] for n in rule.ours], spec)):
            full = name if name in HEAD_KEYS else layout.prefix + name
            out[full] = tensor.detach().to("cpu").contiguous()
    return out


def write_hf_config(spec: ModelSpec, directory: Path, dtype: torch.dtype) -> None:
    config = spec.to_hf_config()
    config["dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def save(model: Transformer, path: str | Path, *, max_shard_bytes: int = MAX_SHARD_BYTES,
         overwrite: bool = False) -> Path:
    """Write `model` as an HF directory in its family's own layout; atomic (staging dir, rename).
    An existing model folder at `path` is replaced only with `overwrite`; anything else is refused."""
    spec = model.spec
    if model.layer_range != (0, spec.num_layers) or not model.has_embed or (spec.causal and not model.has_head):
        raise CheckpointError(
            f"cannot save a slice (layers {list(model.layer_range)}) as a model; fuse the stages first"
        )
    target = check_output_dir(path, overwrite=overwrite)
    tensors = hf_tensors(spec, model.state_dict())
    with staged_dir(target) as staging:
        _write_shards(tensors, staging, max_shard_bytes)
        write_hf_config(spec, staging, next(iter(tensors.values())).dtype)
        for name, data in model.side_files.items():
            (staging / name).write_bytes(data)
        if model.tokenizer is not None and "tokenizer.json" not in model.side_files:
            model.tokenizer.save(str(staging / "tokenizer.json"))
    return target


def _write_shards(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map: dict[str, Any] = {}
    for n, shard in enumerate(shards, 1):
        filename = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / filename), metadata={"format": "pt"})
        weight_map.update({name: filename for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# Writing outputs without ever losing data. A model is built in a staging folder beside its target
# and renamed onto it when complete; the previous output is set aside first and deleted only after
# that rename. A writer killed on the way leaves a staging folder (named with its host and pid) and
# perhaps the set-aside output: the next writer of the same target sweeps both (putting the old
# output back if the new one never took its place), so a target is always absent, old or new.
HOST = socket.gethostname()
_STAGING = re.compile(r"\.staging-(\d+)-[0-9a-f]+@(.+)")  # what follows ".{target name}"


def check_output_dir(path: str | Path, *, overwrite: bool, inputs: Sequence[str | Path] = ()) -> Path:
    """Refuse a model output folder that would destroy data: one of the `inputs` or a folder above
    one, a file, or a non-empty folder — unless that holds only a model (config.json, safetensors,
    tokenizer files) and `overwrite` says to replace it. Sweeps a killed writer's leftovers first."""
    target = Path(path)
    for given in inputs:
        source = Path(given).resolve()
        if target.resolve() in (source, *source.parents):
            raise ConfigError(f"{target}: is (or holds) the input {given}; write the output somewhere else")
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ConfigError(f"{target}: exists and is not a folder (or is a link); a model is written as a folder — "
                          "choose a new or empty folder")
    if not target.is_dir():
        return target
    held = sorted(p.name for p in target.iterdir())
    if not held:
        return target
    others = [name for name in held if name not in MODEL_FILES and not _is_weights(name)]
    if others or "config.json" not in held or not any(map(_is_weights, held)):
        raise ConfigError(f"{target}: holds other files than a model ({_names(others or held)}); "
                          "choose a new or empty folder")
    if not overwrite:
        raise ConfigError(f"{target}: already holds a model; replace it with --force (overwrite=True)")
    return target


def _is_weights(name: str) -> bool:
    return name.startswith("model") and name.endswith(".safetensors")


def staging_path(target: Path) -> Path:
    """A fresh name beside `target` to write it under, then rename onto it (files or folders)."""
    return target.with_name(f".{target.name}.staging-{os.getpid()}-{secrets.token_hex(4)}@{HOST}")


@contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """A new staging folder for `target`, renamed onto it when the block ends without error and
    removed when it does not (a SIGKILL leaves it for the next writer's sweep)."""
    staging = staging_path(target)
    staging.mkdir()  # created with the umask, unlike tempfile.mkdtemp's 0700
    try:
        yield staging
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already gone after a successful rename


def replace_dir(staging: Path, target: Path) -> None:
    """Move the finished staging dir into place; an existing target is set aside until then."""
    mode = 0o666 & ~umask()
    for f in staging.iterdir():
        os.chmod(f, mode)  # safetensors creates its files 0600 whatever the umask
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    if target.exists():
        old = _set_aside(target)
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)


def sweep_stale(target: Path) -> None:
    """Remove what killed writers of `target` on this host left, and put back a set-aside output
    whose replacement never arrived. Staging of a live writer (or one on another host) is kept."""
    for path in target.parent.glob(f".{glob.escape(target.name)}.staging-*"):
        match = _STAGING.fullmatch(path.name[len(target.name) + 1:])
        if match and match[2] == HOST and not _alive(int(match[1])):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    old = _set_aside(target)
    if old.is_dir():
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)  # a delete that was cut short
        else:
            old.rename(target)  # killed between setting the old output aside and renaming the new


def _set_aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask
