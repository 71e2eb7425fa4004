"""The training run's configuration: one YAML file, validated by pydantic, overridable by flags.

Every key is typed and unknown keys are errors naming the key and the allowed ones, so a typo
(`lr_warmup` for `warmup_steps`) fails at once instead of silently training with a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from alloy.errors import ConfigError
from alloy.jsonio import validation_message


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    path: str = "stdlib"  # "stdlib" (Python's own sources), a text file, a directory, or a .jsonl file
    text_field: str = "text"  # the JSONL field holding the text
    max_bytes: int = Field(default=8_000_000, gt=0)  # read at most this much text
    val_fraction: float = Field(default=0.05, ge=0, lt=1)  # held-out share of the tokens
    # "chat": JSONL conversations (messages, instruction/input/output, or prompt/completion rows)
    # rendered with the model's chat template, loss on the assistant's tokens only, packed whole
    # into seq_len units (docs/LORA.md); "text": raw text; "auto": chat when a .jsonl file's first
    # row has one of those shapes, text otherwise.
    format: Literal["auto", "text", "chat"] = "auto"


class OptimizerConfig(_Section):
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)


class ScheduleConfig(_Section):
    warmup_steps: int = Field(default=10, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)  # cosine decays to lr * this


class CheckpointConfig(_Section):
    every: int = Field(default=100, ge=1)  # steps between checkpoints (and one at the end)
    keep_last: int = Field(default=2, ge=1)


class LoraSection(_Section):
    """LoRA fine-tuning (alloy.model.lora): the base frozen, low-rank adapters trained."""

    rank: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)  # the update is scaled by alpha / rank
    dropout: float = Field(default=0.0, ge=0, lt=1)  # on the adapters' input only
    targets: list[str] | None = None  # Alloy linear names (wq, wk, wv, wo, gate, up, down); None: all of them
    # QLoRA: hold the frozen block linears as GGUF blocks of this format (8 or 4 bits a weight, CPU workers)
    quantize_base: Literal["q8_0", "q4_0", "q4_1", "q4_k"] | None = None


class TrainConfig(_Section):
    model: str = "tiny-llama"  # preset, config.json, or an HF directory to fine-tune from
    data: DataConfig = DataConfig()
    devices: str = "auto"  # "auto" (measure this machine) or a cluster JSON file
    batch_size: int = Field(default=8, ge=1)  # global: samples per optimizer step, over all replicas
    seq_len: int = Field(default=128, ge=2)
    steps: int | None = Field(default=None, ge=1)
    epochs: float | None = Field(default=None, gt=0)
    grad_accum: int = Field(default=1, ge=1)
    grad_clip: float = Field(default=1.0, ge=0)  # 0 turns clipping off
    precision: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: Literal["auto", "on", "off"] = "auto"  # auto: as the plan says
    micro_batches: int | None = Field(default=None, ge=1)  # None: the planner picks
    # Run the planner's best candidates and the baselines (equal shares, fastest alone, proportional
    # shares) for a few steps each and keep the measured-fastest; devices that are not here
    # (a declared cluster) cannot be run, and then the plan is the planner's prediction alone.
    verify: bool = True
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    lora: LoraSection | None = None  # absent: full fine-tuning; present: final/ is a PEFT adapter, not a model
    eval_every: int = Field(default=50, ge=1)
    eval_batches: int = Field(default=2, ge=1)
    out_dir: str = "runs/train"
    seed: int = 0
    tensorboard: bool = False
    fuse: bool = True  # write RUN_DIR/final/ (a Hugging Face directory) at the end
    stop_at: int | None = Field(default=None, ge=1)  # stop after this step, as if interrupted

    @model_validator(mode="after")
    def _length(self) -> "TrainConfig":
        if self.steps is None and self.epochs is None:
            self.steps = 100
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        return self


def _fields(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


def _describe(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        section: type[BaseModel] = TrainConfig
        for part in first["loc"][:-1]:
            annotation = section.model_fields[str(part)].annotation
            # an optional section (`lora: LoraSection | None`) names its class inside the union
            options = [a for a in (annotation, *get_args(annotation)) if isinstance(a, type)]
            section = next((a for a in options if issubclass(a, BaseModel)), section)
        return f"{source}: unknown key {loc!r}; allowed: {_fields(section)}"
    return f"{source}: {validation_message(err)}"


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[keys[-1]] = value


def _pairs(overrides: list[str]) -> list[tuple[str, str]]:
    """(key, raw value) of each `--key=value`, `--key value` or `key=value` item, in order."""
    pairs, items = [], iter(overrides)
    for item in items:
        key, sep, raw = item.removeprefix("--").partition("=")
        if not sep and item.startswith("--"):
            raw = next(items, None)
            if raw is None or raw.startswith("--"):
                raise ConfigError(f"override {item!r} has no value; write {item}=VALUE or {item} VALUE")
        elif not sep:
            raise ConfigError(f"override {item!r} is not --key=value or --key value")
        if not key:
            raise ConfigError(f"override {item!r} names no key")
        pairs.append((key, raw))
    return pairs


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read YAML (or start from the defaults), apply `--key=value` / `--section.key value` overrides."""
    data: dict[str, Any] = {}
    source = str(path) if path else "defaults"
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())[:200]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    for key, raw in _pairs(overrides):
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {key}: {raw!r} is not a YAML value") from None
        _set_dotted(data, key.replace("-", "_"), value)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None
