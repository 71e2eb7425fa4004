"""`alloy plan`: split a model's layers and a batch over devices by what each can measurably do."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console

from alloy.devices import Inventory
from alloy.errors import ConfigError, PlanError
from alloy.plan import Workload, fast_dtype, make_plan
from alloy.checkpoint import resolve_spec


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="preset name, HF model directory, or config.json path")
    parser.add_argument("--devices", default="auto",
                        help="'auto' (measure this machine's devices) or a cluster/inventory JSON file")
    parser.add_argument("--use", help="comma-separated device names to plan over (default: all)")
    parser.add_argument("--task", choices=("train", "infer"), default="train")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="samples per optimizer step (train) or concurrent requests (infer)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sample / prompt (default: 2048 "
                        "or the model's maximum if smaller)")
    parser.add_argument("--new-tokens", type=int, default=128, help="infer: tokens generated per request")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16", "fp8", "int8"), default="auto",
                        help="compute dtype; auto: bf16, else fp16, when every device runs it fast; else fp32")
    parser.add_argument("--micro-batches", type=int, default=None, help="pipeline micro-batches (default: search)")
    parser.add_argument("--replicas", type=int, default=None, help="data-parallel replicas (default: search)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing (train)")
    parser.add_argument("--lora-rank", type=int, default=None,
                        help="train: LoRA fine-tuning with adapters of this rank (the base frozen: no gradient, "
                             "optimizer state or all-reduce for it)")
    parser.add_argument("--quantize-base", choices=("q8_0", "q4_0", "q4_1", "q4_k"), default=None,
                        help="train with --lora-rank (QLoRA): price the frozen block linears as GGUF blocks "
                             "of this format (8.5 or 4.5-5 bits a weight) instead of fp32")
    parser.add_argument("--layers-only", action="store_true",
                        help="infer with a mixture-of-experts model: split by whole layers only (by default the "
                             "experts of some layers may run on another device than their attention)")
    parser.add_argument("--json", action="store_true", help="print the plan document instead of the table")
    parser.add_argument("--out", help="write the plan document (JSON) here")
    parser.add_argument("--png", help="draw the layout and the pipeline timeline into this PNG")
    parser.add_argument("--verify", action="store_true",
                        help="train: run the best candidates and the baselines (equal shares, fastest device "
                             "alone, proportional shares) for a few real steps each on these devices and keep "
                             "the measured-fastest; every trial's predicted and measured step is in the plan")


def load_devices(source: str) -> Inventory:
    if source != "auto":
        return Inventory.load(source)
    try:
        from alloy.devices.local import profile
    except ImportError as err:
        raise PlanError(f"--devices auto needs device measurement, which is unavailable ({err}); "
                        "pass a cluster JSON instead") from None
    return profile()


def _verified(spec, inventory, work, names, args):
    from alloy.runtime.calibrate import calibrate, runs_here

    if work.task != "train":
        raise PlanError("--verify runs training steps; it is for --task train")
    if args.replicas is not None:
        raise PlanError("--verify chooses among layouts by measuring them; drop --replicas")
    chosen = names or [d.name for d in inventory.devices]
    away = [n for n in chosen if not runs_here(inventory.device(n))]
    if away:
        raise PlanError(f"--verify needs devices that run here; {', '.join(away)} "
                        f"{'is' if len(away) == 1 else 'are'} declared, not measured on this machine")
    from alloy.runtime.verify import verify

    console = Console(stderr=True)
    inventory = calibrate(inventory, spec=spec, names=chosen)
    return verify(spec, inventory, work, device_names=names, log=console.print, precision=work.dtype
                  if work.dtype in ("fp32", "bf16") else "fp32", activation_checkpointing=work.checkpointing,
                  lora={"rank": work.lora_rank, "quantize_base": work.quantize_base} if work.lora_rank else None)


def check_output(path: str, flag: str) -> None:
    """Refuse an output path that cannot be written before planning (--verify runs training steps
    first), and never replace a folder or a device with a plan. The write can still fail (a full
    disk); `alloy` then says so in one line."""
    target = Path(path)
    if target.exists() and not target.is_file():
        raise ConfigError(f"{flag} {path}: exists and is not a regular file")
    folder = next(p for p in target.absolute().parents if p.exists())  # the write makes the rest
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ConfigError(f"{flag} {path}: cannot write in {folder}")


def run(args) -> int:
    for path, flag in ((args.out, "--out"), (args.png, "--png")):
        if path:
            check_output(path, flag)
    spec = resolve_spec(args.model)
    inventory = load_devices(args.devices)
    names = None if args.use is None else [n.strip() for n in args.use.split(",") if n.strip()]
    if args.dtype == "auto":
        args.dtype = fast_dtype(inventory, names)
    work = Workload(task=args.task, batch_size=args.batch_size,
                    seq_len=args.seq_len or min(2048, spec.max_seq_len - (args.task == "infer") * args.new_tokens),
                    dtype=args.dtype, micro_batches=args.micro_batches, checkpointing=args.checkpointing,
                    new_tokens=args.new_tokens, lora_rank=args.lora_rank,
                    quantize_base=args.quantize_base)
    if args.verify:
        plan = _verified(spec, inventory, work, names, args)
    else:
        plan = make_plan(spec, inventory, work, device_names=names, replicas=args.replicas,
                         expert_offload=not args.layers_only)
    if args.out:
        plan.save(args.out)
    if args.png:
        from alloy.plan.explain import write_png

        Path(args.png).parent.mkdir(parents=True, exist_ok=True)  # as --out does
        write_png(plan, args.png)
    if args.json:
        print(plan.to_json(), end="")
        return 0
    from alloy.plan.explain import plan_tables

    Console().print(plan_tables(plan))
    return 0
