"""`alloy VERB ...`: thin wrappers over the library. A user error prints one line and exits 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from alloy.errors import AlloyError

# verb -> module under alloy.cli; each module has `add_arguments(parser)` and `run(args) -> int`.
VERBS = {
    "demo": "The main job on a built-in default: measure, plan, train over emulated devices, fuse, generate.",
    "devices": "Show this machine's devices, measured (cached), or validate a declared cluster file.",
    "plan": "Split a model's layers and a batch over devices by measured speed and memory.",
    "train": "Train or fine-tune a model from a YAML config over the planned devices.",
    "fuse": "Fuse a run's checkpoint shards into one model: HF directory, GGUF or ONNX.",
    "merge": "Merge same-spec models: linear, task arithmetic, TIES or SLERP.",
    "export": "Convert a model directory to ONNX or GGUF.",
    "generate": "Continue a prompt with a model (KV-cached; fp32, bf16 or int8; split over devices).",
    "serve": "Serve a model over an OpenAI-compatible HTTP API with continuous batching.",
    "chat": "Chat with a model in the terminal (streaming, history, /reset, /system).",
    "inspect": "Show a model's architecture (spec) and size: preset, HF directory or config.json.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alloy",
        description="Run standard-architecture language models on every chip you have, at once.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, help_text in VERBS.items():
        module = importlib.import_module(f"alloy.cli.{verb}")
        verb_parser = sub.add_parser(verb, help=help_text, description=help_text)
        module.add_arguments(verb_parser)
        verb_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return args._run(args) or 0
    except AlloyError as err:
        print(f"alloy {args.verb}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"alloy {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
