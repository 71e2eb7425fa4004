"""`alloy train CONFIG.yaml [--key=value ...] [--plan plan.json] [--resume] [--print-config]`.

Overrides use the config's keys, dotted for sections: `--steps=200 --optimizer.lr=3e-4`.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from alloy.train.config import load_config


def add_arguments(parser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (omit to start from the defaults)")
    parser.add_argument("--plan", help="run this plan document instead of planning (it must match the config)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in out_dir from its last complete checkpoint")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--max-restarts", type=int, default=1,
                        help="when a worker dies, start every worker again from the last complete checkpoint "
                             "this many times before giving up (default 1; 0 fails at once)")
    parser.add_argument("--no-verify", action="store_true",
                        help="commit to the planner's prediction without first running the best candidates "
                             "and the baselines for a few steps each (same as --verify=false)")
    parser.epilog = ("Any config key can be overridden: --steps=200 --optimizer.lr=3e-4 --data.path=notes.txt. "
                     "Files go to out_dir: metrics.jsonl, checkpoints/, loss.png, final/ (a Hugging Face model).")
    parser.set_defaults(_accepts_overrides=True)


def run(args) -> int:
    if args.max_restarts < 0:
        from alloy.errors import ConfigError
        raise ConfigError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    config = load_config(args.config, list(args.overrides) + (["verify=false"] if args.no_verify else []))
    if args.print_config:
        print(json.dumps(config.model_dump(), indent=2))
        return 0
    from alloy.train.run import train

    console = Console(stderr=True)
    with progress_callback(console, config.steps) as on_line:
        result = train(config, plan_path=args.plan, resume=args.resume, progress=on_line, log=console.print,
                       max_restarts=args.max_restarts)
    _summary(console, result)
    return 0


@contextmanager
def progress_callback(console: Console, total_steps: int | None):
    """A rich progress bar fed by the run's metrics lines: step, loss, tokens/s, ETA."""
    progress = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), console=console)
    task = None

    def on_line(line: dict) -> None:
        nonlocal task
        if task is None:
            task = progress.add_task("train", total=total_steps, status="", completed=line["step"] - 1)
        status = f"loss {line['loss']:.4f}  {line['tokens_per_s']:,.0f} tok/s"
        if "eval_loss" in line:
            status += f"  val {line['eval_loss']:.4f}"
        progress.update(task, completed=line["step"], status=status)

    with progress:
        yield on_line


def _summary(console: Console, r) -> None:
    table = Table(title=f"run {r.out_dir}", show_header=False)
    table.add_row("steps", f"{r.steps_done}/{r.total_steps}")
    if r.first_loss is not None:
        table.add_row("loss", f"{r.first_loss:.4f} -> {r.last_loss:.4f}")
    if r.eval_loss is not None:
        table.add_row("validation loss", f"{r.eval_loss:.4f} (perplexity {2.718281828 ** r.eval_loss:.1f})")
    table.add_row("throughput", f"{r.tokens_per_s:,.0f} tokens/s")
    if r.predicted_step_s:
        error = abs(r.measured_step_s - r.predicted_step_s) / r.measured_step_s
        table.add_row("step time", f"{r.measured_step_s:.3f} s measured, {r.predicted_step_s:.3f} s planned "
                                   f"({error:.0%} off)")
    table.add_row("plan", str(r.plan_path))
    table.add_row("metrics", str(r.out_dir / "metrics.jsonl"))
    if r.loss_png:
        table.add_row("loss curve", str(r.loss_png))
    if r.final_dir:
        table.add_row("model", f"{r.final_dir} (Hugging Face format)")
    elif r.steps_done < r.total_steps:
        table.add_row("resume", f"alloy train ... --resume (stopped at step {r.steps_done})")
    for note in r.notes:
        table.add_row("note", note)
    console.print(table)
