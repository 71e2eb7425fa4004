"""`alloy VERB ...`: thin wrappers over the library. A user error prints one line and exits 2; an
error of the operating system (a read-only or full disk, a missing folder, no permission) prints
one line and exits 1. Neither prints a traceback."""

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
    "pull": "Download a model (org/name[@revision]) into the local Hugging Face cache.",
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


def _split_overrides(argv: list[str], unknown: list[str]) -> tuple[list[str], list[str]]:
    """(argv without the overrides, the overrides in their order): the items argparse did not
    know that look like `--key`, `--key=value` or `key=value`, each `--key` with the value after
    it. Taken out before the real parse, so that argparse never reads the 500 of `--steps 500` as
    the verb's positional argument (the config file of `alloy train`)."""
    ours = {token for token in unknown if token.startswith("--") or "=" in token}
    rest, overrides, i = [], [], 0
    while i < len(argv):
        token, i = argv[i], i + 1
        if token not in ours:
            rest.append(token)
            continue
        overrides.append(token)
        if "=" not in token and i < len(argv) and not argv[i].startswith("--"):
            overrides.append(argv[i])  # the value of `--key value`
            i += 1
    return rest, overrides


def _os_error(err: OSError) -> str:
    """'Permission denied (/data/out)', 'No space left on device (plan.json)'."""
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    what = err.strerror or str(err)
    return f"{what} ({' -> '.join(paths)})" if paths else what


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        argv, overrides = _split_overrides(argv, extra)
        args, rest = parser.parse_known_args(argv)
        extra = overrides + rest
    args.overrides = extra
    try:
        return args._run(args) or 0
    except AlloyError as err:
        print(f"alloy {args.verb}: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # whatever file the verb wrote or read; every verb, one line, no traceback
        print(f"alloy {args.verb}: error: {_os_error(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"alloy {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
