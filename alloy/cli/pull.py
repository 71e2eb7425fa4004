"""`alloy pull org/name[@revision]`: download a model into the Hugging Face cache, so that
`--model org/name` finds it offline afterwards."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("model", help="a Hugging Face hub id: org/name or org/name@revision")


def run(args) -> int:
    from alloy.checkpoint.hub import pull

    folder = pull(args.model)
    print(f"pulled {args.model} -> {folder}")
    return 0
