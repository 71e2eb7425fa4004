"""LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names an adapter by the Hugging Face module it sits on
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so names go through the
family's key map (alloy.checkpoint.keymap), the same rules that map the base weights.

Where HF fuses linears that Alloy keeps apart (Phi-3 `qkv_proj`, GPT-2 `c_attn`, GPT-NeoX
`query_key_value`), an adapter on the fused linear is exactly a set of adapters on the parts:
  load: every part gets the fused A [R, in] and its own rows of B (split as the weight is);
  save: A = [A_q; A_k; A_v] (rank R = sum of the parts') and B block-diagonal, laid out as the
        weight is, with PEFT's `rank_pattern` / `alpha_pattern` keeping each module's scale.
Both are the same function of x, so logits agree to rounding either way.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from alloy.checkpoint.keymap import HEAD_KEYS, LAYOUTS, SPLIT_QKV, Transform
from alloy.errors import CheckpointError, ConfigError
from alloy.model.lora import LoraLinear, lora_modules
from alloy.spec import ModelSpec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# How B's rows follow the weight's: a Conv1D transpose concerns the weight's storage, not its rows
# (PEFT's lora_B is [out, rank] whatever the base layer's layout).
_ROW_TRANSFORMS = {"transpose": None, "conv1d_split_qkv": SPLIT_QKV}

Adapters = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # Alloy module -> (A, B, scale)


def _linear_rules(spec: ModelSpec) -> dict[str, tuple[tuple[str, ...], Transform | None]]:
    """HF module name (with the body prefix) -> (Alloy linear module names, row transform)."""
    from alloy.model import Transformer

    layout = LAYOUTS[spec.family]
    with torch.device("meta"):
        linears = {n for n, m in Transformer(spec).named_modules() if isinstance(m, nn.Linear)}
    out = {}
    for rule in layout.expand(spec):
        hf, ours = rule.hf[0], [name.removesuffix(".weight") for name in rule.ours]
        if len(rule.hf) != 1 or not hf.endswith(".weight") or not all(o in linears for o in ours):
            continue
        module = hf.removesuffix(".weight")
        full = module if hf in HEAD_KEYS else layout.prefix + module
        out[full] = (tuple(ours), _ROW_TRANSFORMS.get(rule.transform.name, rule.transform))
    return out


def model_adapters(model: nn.Module) -> Adapters:
    return {name: (m.lora_A.detach(), m.lora_B.detach(), m.scale) for name, m in lora_modules(model).items()}


def adapter_files(spec: ModelSpec, adapters: Adapters, *, dropout: float = 0.0,
                  base_model: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(PEFT tensors, adapter_config.json contents) for `adapters` of a model of `spec`."""
    if not adapters:
        raise CheckpointError("the model carries no LoRA adapters to save")
    rules = _linear_rules(spec)
    tensors, shapes = {}, {}  # shapes: HF module -> (rank, alpha)
    for hf_module, (parts, rows) in rules.items():
        held = [p for p in parts if p in adapters]
        if not held:
            continue
        scale = adapters[held[0]][2]
        if len(parts) == 1:
            A, B, _ = adapters[parts[0]]
        else:  # a fused HF linear: A stacked, B block-diagonal (zero rows for parts without an adapter)
            A = torch.cat([adapters[p][0] for p in held])
            blocks, column = [], 0
            for part in parts:
                out_features = _out_features(spec, part)
                block = A.new_zeros(out_features, A.shape[0])
                if part in adapters:
                    a, b, part_scale = adapters[part]
                    block[:, column : column + a.shape[0]] = b * (part_scale / scale)
                    column += a.shape[0]
                blocks.append(block)
            B = rows.save(blocks, spec)[0] if rows is not None else blocks[0]
        key = PEFT_PREFIX + hf_module
        tensors[key + ".lora_A.weight"] = A.detach().cpu().contiguous()
        tensors[key + ".lora_B.weight"] = B.detach().cpu().contiguous()
        shapes[hf_module] = (A.shape[0], scale * A.shape[0])
    missing = sorted(set(adapters) - {p for parts, _ in rules.values() for p in parts})
    if missing:
        raise CheckpointError(f"adapters on {', '.join(missing[:3])} have no Hugging Face name in {spec.family}")
    rank, alpha = max(set(shapes.values()), key=list(shapes.values()).count)  # the common case
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if spec.causal else None,
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        # full module names: a leaf name such as GPT-2's c_proj would also match the MLP's
        "target_modules": sorted(shapes),
        "rank_pattern": {m: r for m, (r, a) in shapes.items() if r != rank},
        "alpha_pattern": {m: a for m, (r, a) in shapes.items() if a != alpha},
        "bias": "none",
        "fan_in_fan_out": spec.family == "gpt2",  # GPT-2's Conv1D stores weights [in, out]
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    return tensors, config


def _out_features(spec: ModelSpec, module: str) -> int:
    leaf = module.rpartition(".")[2]
    kv = spec.num_kv_heads * spec.head_dim
    return {"wq": spec.num_heads * spec.head_dim, "wk": kv, "wv": kv,
            "gate": spec.intermediate_size, "up": spec.intermediate_size}[leaf]


def write_adapter(spec: ModelSpec, adapters: Adapters, path: str | Path, *, dropout: float = 0.0,
                  base_model: str | None = None) -> Path:
    tensors, config = adapter_files(spec, adapters, dropout=dropout, base_model=base_model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path


def save_adapter(model: nn.Module, path: str | Path, *, base_model: str | None = None) -> Path:
    """Write the LoRA adapters of `model` (a whole model after apply_lora) in PEFT's format."""
    modules = lora_modules(model)
    dropout = next((m.dropout.p for m in modules.values() if isinstance(m.dropout, nn.Dropout)), 0.0)
    return write_adapter(model.spec, model_adapters(model), path, dropout=dropout, base_model=base_model)


def _pattern(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: a pattern key matches a module name's dotted suffix, as a regex."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(spec: ModelSpec, path: str | Path) -> tuple[Adapters, dict]:
    """A PEFT LoRA adapter directory -> (Alloy module -> (A, B, scale), its config), checked against spec."""
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{path}: not a PEFT adapter (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{path}: a {config['peft_type']} adapter; only LoRA is supported")
    for key, plain in (("use_dora", False), ("bias", "none"), ("lora_bias", False), ("modules_to_save", None)):
        if config.get(key, plain) not in (plain, []):
            raise ConfigError(f"{path}: {key}={config[key]!r} is not supported (only {plain!r})")
    rules = _linear_rules(spec)
    with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    modules = {}
    for key in tensors:
        module, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        module = module.replace(".default", "")  # PEFT drops the adapter name on save; tolerate it
        if not key.startswith(PEFT_PREFIX) or kind not in ("A.weight", "B.weight"):
            raise CheckpointError(f"{path}: {key} is not a LoRA tensor name PEFT writes")
        if module not in rules:
            raise CheckpointError(f"{path}: adapter tensor {key} names no linear of this {spec.family} "
                                  f"model; is the adapter for a different base model?")
        modules.setdefault(module, {})[kind[0]] = tensors[key]
    adapters: Adapters = {}
    for module, pair in modules.items():
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{path}: {module} has lora_{''.join(pair)} but not both lora_A and lora_B")
        A, B = pair["A"], pair["B"]
        parts, rows = rules[module]
        rank = A.shape[0]
        alpha = _pattern(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        if B.ndim != 2 or B.shape[1] != rank:
            raise CheckpointError(f"{path}: {module} lora_B {list(B.shape)} does not match lora_A {list(A.shape)}")
        try:
            Bs = rows.load([B], spec) if len(parts) > 1 else [B]
        except RuntimeError:
            Bs = None
        expected_out = sum(_out_features(spec, p) for p in parts) if len(parts) > 1 else None
        if Bs is None or (expected_out is not None and B.shape[0] != expected_out):
            raise CheckpointError(f"{path}: {module} lora_B {list(B.shape)} does not fit this model "
                                  f"(different base model?)")
        for part, b in zip(parts, Bs):
            adapters[part] = (A, b.contiguous(), scale)
    return adapters, config


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Put the PEFT adapter at `path` onto `model` (a whole model or a pipeline slice; its own
    layers only), frozen base, adapters trainable. Shapes are checked against each linear."""
    adapters, config = read_adapter(model.spec, path)
    if lora_modules(model):
        raise ConfigError("the model already carries LoRA adapters; merge them first")
    owned = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    for name, (A, B, scale) in adapters.items():
        if name not in owned:
            continue  # another pipeline stage's layer
        base = owned[name]
        if A.shape[1] != base.in_features or B.shape[0] != base.out_features:
            raise CheckpointError(f"{path}: the adapter on {name} is {B.shape[0]}x{A.shape[1]} but the linear is "
                                  f"{base.out_features}x{base.in_features} (different base model?)")
        lora = LoraLinear(base, A.shape[0], scale, float(config.get("lora_dropout") or 0.0))
        with torch.no_grad():
            lora.lora_A.copy_(A)
            lora.lora_B.copy_(B)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, lora)
    return model


def merged_model_dir(model_path: str | Path, adapter_path: str | Path) -> Path:
    """A temporary HF directory holding the base at `model_path` with the adapter at `adapter_path`
    folded in (removed when the process exits): every inference path (one device, pipelines, worker
    processes, quantized formats) loads a directory, so an adapter reaches all of them this way."""
    import atexit
    import shutil
    import tempfile

    import alloy
    from alloy.model.lora import merge_lora

    model = merge_lora(load_adapter(alloy.load(model_path), adapter_path))
    scratch = Path(tempfile.mkdtemp(prefix="alloy-lora-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return alloy.save(model, scratch / "merged")
