"""`alloy train`: a config in; a plan, a trained model, metrics, a picture and a report out.

RUN_DIR holds everything a run makes, so a run can be inspected, resumed or fused later:
    run.json            the resolved config, model spec and step count (written first)
    plan.json           the layout the workers ran
    tokenizer.json      the model's own, or a byte-level BPE trained on the corpus
    tokenizer_config.json  the model's, with the chat template the data was rendered with inlined
    data/tokens.bin     the tokenized corpus (train, then validation tokens); tokens.json its counts
    metrics.jsonl       one line per step: loss, lr, grad norm, tokens/s, per-device step time
    checkpoints/        per-rank shards with a manifest (alloy.runtime.checkpoint)
    loss.png            the loss curve
    final/              the fused Hugging Face model (unless fuse: false); with `lora:`, the
                        adapter in PEFT's format (adapter_config.json names the base model)
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from alloy.errors import CheckpointError, ConfigError
from alloy.train.config import TrainConfig


@dataclass
class TrainResult:
    out_dir: Path
    steps_done: int
    total_steps: int
    first_loss: float | None
    last_loss: float | None
    eval_loss: float | None
    tokens_per_s: float
    predicted_step_s: float | None
    measured_step_s: float
    plan_path: Path
    final_dir: Path | None
    loss_png: Path | None
    notes: list[str] = field(default_factory=list)


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def resolve_model(name: str):
    """(spec, init_dir): an HF directory with weights is fine-tuned from; anything else starts fresh."""
    from alloy.checkpoint import resolve_spec
    from alloy.spec import ModelSpec, read_config

    path = Path(name)
    if _is_hf_dir(path):
        return ModelSpec.from_hf_config(read_config(path)), str(path)
    return resolve_spec(name), None


def _tokenizer(config: TrainConfig, init_dir: str | None, out_dir: Path, vocab_size: int, side_files: dict):
    from tokenizers import Tokenizer

    from alloy.train.data import EOT, corpus_format, documents, rendered_conversations, train_tokenizer
    from alloy.train.instruct import CHATML_TOKENS, ChatFormat

    saved = out_dir / "tokenizer.json"
    if saved.is_file():
        return Tokenizer.from_file(str(saved))
    chat = corpus_format(config.data) == "chat"
    fmt = ChatFormat.for_model(side_files)
    # fuse copies tokenizer_config.json into final/: with the template the data was rendered with
    # (a chat_template.jinja or ChatML inlined), `alloy generate --chat` prompts as training did
    if chat or not fmt.builtin:
        (out_dir / "tokenizer_config.json").write_bytes(fmt.tokenizer_config())
    elif side_files.get("tokenizer_config.json"):
        (out_dir / "tokenizer_config.json").write_bytes(side_files["tokenizer_config.json"])
    source = Path(init_dir) / "tokenizer.json" if init_dir else None
    if source and source.is_file():
        shutil.copy(source, saved)
        return Tokenizer.from_file(str(saved))
    if chat:  # trained on conversations as ChatML writes them, its markers special tokens
        tokenizer = train_tokenizer(rendered_conversations(config.data, fmt), vocab_size, (EOT, *CHATML_TOKENS))
    else:
        tokenizer = train_tokenizer(documents(config.data), vocab_size)
    tokenizer.save(str(saved))
    return tokenizer


def _inventory(devices: str):
    from alloy.devices import Inventory

    if devices == "auto":
        from alloy.devices import profile

        return profile()
    return Inventory.load(devices)


def _plan(config: TrainConfig, spec, out_dir: Path, plan_path: str | None, resume: bool, log=print):
    from alloy.plan import Plan, Workload
    from alloy.plan.planner import check_fits
    from alloy.runtime.layout import PlanMismatchError

    saved = out_dir / "plan.json"
    if plan_path:
        plan = Plan.load(plan_path)
    elif resume and saved.is_file():
        plan = Plan.load(saved)  # a resumed run keeps its layout
    else:
        checkpointing = {"on": True, "off": False}.get(config.activation_checkpointing, False)
        work = Workload("train", config.batch_size, config.seq_len, dtype=config.precision,
                        micro_batches=config.micro_batches, checkpointing=checkpointing,
                        lora_rank=config.lora.rank if config.lora else None,
                        quantize_base=config.lora.quantize_base if config.lora else None)
        plan = plan_for(spec, _inventory(config.devices), work, verify=config.verify, log=log,
                        precision=config.precision, activation_checkpointing=checkpointing,
                        lora=_lora_job(config))
    if plan.model.spec != spec.to_dict():
        raise PlanMismatchError(f"{plan_path or saved}: the plan was made for another model "
                                f"({plan.model.family}, {plan.model.num_layers} layers)")
    if plan.batch_size != config.batch_size or plan.seq_len != config.seq_len:
        raise PlanMismatchError(f"the plan is for batch {plan.batch_size} x {plan.seq_len} tokens; the config asks "
                                f"for {config.batch_size} x {config.seq_len}")
    if plan_path:  # made elsewhere or edited: priced again before a worker starts
        check_fits(plan, spec, str(plan_path))
    plan.save(saved)
    return plan


def _lora_job(config: TrainConfig) -> dict | None:
    return config.lora.model_dump() if config.lora else None


def _check_lora_targets(config: TrainConfig, spec) -> None:
    """Bad targets fail here, in one line, before any worker starts."""
    if config.lora:
        import torch

        from alloy.model import Transformer
        from alloy.model.lora import LoraConfig, apply_lora

        with torch.device("meta"):
            apply_lora(Transformer(spec), LoraConfig(**config.lora.model_dump()))


def _write_lora_final(config: TrainConfig, spec, report, init_dir: str | None, target: Path) -> Path:
    """The trained adapters (replica 0's stages) as a PEFT adapter directory, naming its base."""
    from alloy.checkpoint.lora import write_adapter

    state = report.state_dict()
    scale = config.lora.alpha / config.lora.rank
    adapters = {name.removesuffix(".lora_A"): (A, state[name.removesuffix("_A") + "_B"], scale)
                for name, A in state.items() if name.endswith(".lora_A")}
    if target.exists():
        shutil.rmtree(target)  # the run's own earlier final/
    base = str(Path(init_dir).resolve()) if init_dir else config.model
    return write_adapter(spec, adapters, target, dropout=config.lora.dropout, base_model=base)


def plan_for(spec, inventory, work, *, verify: bool, log=print, **run_options):
    """The plan a run commits to. Devices that run here get their runtime terms measured
    (alloy.runtime.calibrate, cached); with `verify`, the best candidates and the baselines then
    run for a few steps each and the measured-fastest is kept. A declared cluster (devices not
    here) is planned from its profiles alone, and the log says so."""
    from alloy.plan import make_plan
    from alloy.runtime.calibrate import runs_here

    away = [d.name for d in inventory.devices if not runs_here(d)]
    if away:
        if verify:
            log(f"plan not verified: {', '.join(away)} {'is' if len(away) == 1 else 'are'} declared, not measured here")
        return make_plan(spec, inventory, work)
    from alloy.runtime.calibrate import calibrate

    inventory = calibrate(inventory, spec=spec)
    if not verify:
        return make_plan(spec, inventory, work)
    from alloy.runtime.verify import verify as run_candidates

    plan = run_candidates(spec, inventory, work, log=log, **run_options)
    log(f"verified: {plan.verification.note}")
    return plan


LOCK = ".alloy-lock"  # held by the process training in the directory; also marks a directory alloy train made
RUN_FILES = {"run.json", "plan.json", "tokenizer.json", "tokenizer_config.json", "data", "metrics.jsonl", "workers",
             "checkpoints", LOCK}
DERIVED = ("plan.json", "tokenizer.json", "tokenizer_config.json", "data", "metrics.jsonl", "workers",
           "run.json")  # remade by a fresh start


def _never_stepped(out_dir: Path) -> bool:
    """A run directory that holds only what a run makes before its first checkpoint (a run that
    failed on its data, its plan, or its first steps): safe to start again from nothing."""
    from alloy.runtime import checkpoint as ckpt

    names = {p.name for p in out_dir.iterdir()}
    return names <= RUN_FILES and not ckpt.complete_checkpoints(out_dir / "checkpoints")


def _check_fresh_or_resumable(out_dir: Path, resume: bool, ours: bool, log=print) -> bool:
    """Whether to resume. A directory of a run that never reached a checkpoint starts over, with
    or without --resume (its plan, tokens and tokenizer are made again from the config); `ours`:
    the directory carried our lock file before this run, so what it holds is a run's, not a user's."""
    if ours and any(p.name != LOCK for p in out_dir.iterdir()) and _never_stepped(out_dir):
        log(f"{out_dir}: the run there never reached a checkpoint; starting it again")
        for name in DERIVED:
            path = out_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        return False
    if resume:
        if not (out_dir / "run.json").is_file():
            raise ConfigError(f"{out_dir}: nothing to resume (no run.json); drop --resume to start a new run")
        return True
    if out_dir.exists() and any(p.name != LOCK for p in out_dir.iterdir()):
        raise ConfigError(f"{out_dir} already holds files; pass --resume to continue that run, or set out_dir "
                          "to a new directory (nothing was overwritten)")
    return False



def _lock(out_dir: Path):
    """Hold the run directory for this process (an flock the OS drops when the process dies, even
    by SIGKILL): a second `alloy train` on it, or a --resume while this one runs, is refused."""
    import fcntl
    import os
    import socket

    out_dir.mkdir(parents=True, exist_ok=True)
    handle = open(out_dir / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"{out_dir} is in use by a running alloy train ({owner}); wait for it or stop it") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    return handle


def _check_resume_matches(out_dir: Path, spec, plan) -> None:
    """Refuse before launching anything when the run's checkpoints belong to another model or plan."""
    from alloy.runtime import checkpoint as ckpt
    from alloy.runtime.layout import RunLayout

    found = ckpt.complete_checkpoints(out_dir / "checkpoints")
    if found:
        ckpt.check_compatible(ckpt.read_manifest(found[-1]), spec, RunLayout.from_plan(plan), found[-1])


def _drop_metrics_after_checkpoint(out_dir: Path) -> None:
    """Steps logged after the last checkpoint will run again on resume: drop their lines."""
    from alloy.runtime import checkpoint as ckpt

    found = ckpt.complete_checkpoints(out_dir / "checkpoints")
    last = int(found[-1].name.split("-")[1]) if found else 0
    metrics = out_dir / "metrics.jsonl"
    if metrics.is_file():
        kept = [l for l in metrics.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= last]
        metrics.write_text("".join(l + "\n" for l in kept))


def train(config: TrainConfig, *, plan_path: str | None = None, resume: bool = False, progress=None,
          log=print, max_restarts: int = 1) -> TrainResult:
    """Run (or resume) the training run `config` describes. `max_restarts`: times torchrun starts
    every worker again after one dies; they go on from the last complete checkpoint."""
    out_dir = Path(config.out_dir)
    ours = (out_dir / LOCK).is_file()  # a directory an earlier alloy train made
    held = _lock(out_dir)  # released when this process ends, however it ends
    try:
        return _train(config, out_dir, plan_path, resume, ours, progress, log, max_restarts)
    finally:
        held.close()


def _train(config: TrainConfig, out_dir: Path, plan_path, resume: bool, ours: bool, progress, log,
           max_restarts: int):
    from alloy.checkpoint.io import read_side_files
    from alloy.runtime import Checkpointing, DataSource, OptimConfig, run
    from alloy.train.config import DataConfig
    from alloy.train.data import TokenFile, tokenize_corpus

    resume = _check_fresh_or_resumable(out_dir, resume, ours, log)
    spec, init_dir = resolve_model(config.model)
    if not spec.causal:  # next-token training needs a head over the vocabulary
        raise ConfigError(f"{config.model} is an encoder ({spec.family}); alloy train trains causal language models")
    _check_lora_targets(config, spec)
    if config.seq_len > spec.max_seq_len:
        raise ConfigError(f"seq_len {config.seq_len} is beyond the model's maximum {spec.max_seq_len}")
    if resume:
        saved = json.loads((out_dir / "run.json").read_text())
        if saved["spec"] != spec.to_dict():
            raise CheckpointError(f"{out_dir} holds a run of another model; resume it with its own config")
        if saved["config"].get("lora") != _lora_job(config):  # its checkpoints hold (or lack) those adapters
            raise ConfigError(f"lora changed since the run started ({saved['config'].get('lora')} then, "
                              f"{_lora_job(config)} now); resume with the run's own lora section")
        before = DataConfig().model_dump() | saved["config"]["data"]  # a key added since: its default
        if before != config.data.model_dump():  # its tokens are the old data's: never mix silently
            raise ConfigError(f"data changed since the run started ({before} then, {config.data.model_dump()} now); "
                              "resume with the run's own data, or start a new run")
    out_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    side_files = read_side_files(init_dir) if init_dir else {}  # the init model's chat template and EOS
    tokenizer = _tokenizer(config, init_dir, out_dir, spec.vocab_size, side_files)
    data_meta = out_dir / "data" / "tokens.json"
    if data_meta.is_file():
        tokens = TokenFile.from_dict(json.loads(data_meta.read_text()), out_dir / "data")
        if tokens.format == "chat" and tokens.seq_len != config.seq_len:  # packed to its units
            raise ConfigError(f"{data_meta}: the chat data was packed for seq_len {tokens.seq_len}, not "
                              f"{config.seq_len}; resume with the run's own seq_len, or start a new run")
    else:
        log(f"tokenizing {config.data.path} ...")
        tokens = tokenize_corpus(config.data, tokenizer, out_dir / "data", spec, side_files=side_files,
                                 seq_len=config.seq_len, log=log)
        data_meta.write_text(json.dumps(tokens.to_dict()))
    train_data = DataSource("tokens", seed=config.seed, path=str(tokens.path), start=0, end=tokens.train_stop)
    blocks = train_data.num_blocks(config.seq_len)
    if blocks < 1:
        raise ConfigError(f"data.path: {config.data.path}: {tokens.train_end} training tokens do not fill one "
                          f"block of {config.seq_len + 1}; lower seq_len or add text")
    val_data = DataSource("tokens", seed=config.seed + 1, path=str(tokens.path), start=tokens.train_end,
                          end=tokens.count)
    if val_data.num_blocks(config.seq_len) < 1:
        val_data = None
    steps = config.steps or max(1, math.ceil(config.epochs * blocks / (config.batch_size * config.grad_accum)))

    plan = _plan(config, spec, out_dir, plan_path, resume, log)
    if resume:
        _check_resume_matches(out_dir, spec, plan)
        _drop_metrics_after_checkpoint(out_dir)
    else:
        (out_dir / "run.json").write_text(json.dumps({"config": config.model_dump(), "spec": spec.to_dict(),
                                                      "steps": steps, "init_dir": init_dir}, indent=1))
    total = ""
    if plan.predicted.startup_s is not None:  # short jobs pay start-up as much as steps
        total = (f", about {plan.predicted.startup_s + steps * plan.predicted.step_s:.0f} s with "
                 f"{plan.predicted.startup_s:.1f} s of start-up")
    log(f"plan: {len(plan.replicas)} replica(s), {plan.world_size} worker(s), predicted "
        f"{plan.predicted.step_s:.3g} s/step; {steps} steps of {config.batch_size}x{config.seq_len} tokens{total} "
        f"(prepared in {time.perf_counter() - started:.1f} s)")

    opt = config.optimizer
    optim = OptimConfig(lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay, eps=opt.eps,
                        warmup_steps=config.schedule.warmup_steps, min_lr_ratio=config.schedule.min_lr_ratio,
                        grad_clip=config.grad_clip)
    metrics = out_dir / "metrics.jsonl"
    report = run(
        plan, steps=steps, out_dir=out_dir / "workers", data=train_data, seq_len=config.seq_len, seed=config.seed,
        optim=optim, init_dir=init_dir, timeout_s=max(600.0, 60.0 * steps), progress=progress,
        val_data=val_data, eval_every=config.eval_every,
        eval_batches=config.eval_batches, grad_accum=config.grad_accum, precision=config.precision,
        activation_checkpointing=plan.checkpointing or config.activation_checkpointing == "on",
        checkpoint=Checkpointing(dir=str(out_dir / "checkpoints"), every=config.checkpoint.every,
                                 keep_last=config.checkpoint.keep_last),
        resume=resume, stop_at=config.stop_at, metrics_path=str(metrics), max_restarts=max_restarts,
        lora=_lora_job(config),
    )
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    done = lines[-1]["step"] if lines else 0
    evals = [line["eval_loss"] for line in lines if "eval_loss" in line]
    result = TrainResult(out_dir, done, steps, lines[0]["loss"] if lines else None, lines[-1]["loss"] if lines else None,
                         evals[-1] if evals else None, report.tokens_per_s, report.predicted_step_s,
                         report.measured_step_s, out_dir / "plan.json", None, None)
    off = report.off_term()
    if off:  # the plan did not hold: say by how much and which term of the step was off
        log(f"warning: {off}")
        result.notes.append(f"the plan did not hold: {off}")
    result.loss_png = _plot(lines, out_dir / "loss.png", result.notes)
    if config.tensorboard:
        _tensorboard(lines, out_dir / "tensorboard")
    if config.fuse and done >= steps and config.lora:
        result.final_dir = _write_lora_final(config, spec, report, init_dir, out_dir / "final")
    elif config.fuse and done >= steps:
        from alloy.fuse import fuse_run

        result.final_dir = fuse_run(out_dir, out_dir / "final", overwrite=True)  # the run's own earlier final/
    return result


def _plot(lines: list[dict], path: Path, notes: list[str]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        notes.append("no loss.png: matplotlib is not installed (pip install 'alloy-lm[plot]')")
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([l["step"] for l in lines], [l["loss"] for l in lines], label="train loss")
    evals = [(l["step"], l["eval_loss"]) for l in lines if "eval_loss" in l]
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _tensorboard(lines: list[dict], directory: Path) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard: true needs the tensorboard package (pip install tensorboard)") from None
    writer = SummaryWriter(str(directory))
    for line in lines:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "eval_loss"):
            if key in line:
                writer.add_scalar(key, line[key], line["step"])
    writer.close()
