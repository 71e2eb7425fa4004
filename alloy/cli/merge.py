"""`alloy merge A B [C...] --method ... --out DIR`: merge same-spec models into one."""

from __future__ import annotations

from alloy.fuse.merge import METHODS, merge


def add_arguments(parser) -> None:
    parser.add_argument("models", nargs="+", help="HF model directories with the same spec")
    parser.add_argument("--method", default="linear", choices=METHODS)
    parser.add_argument("--weights", type=float, nargs="+", help="one per model (linear: normalised to sum 1; "
                        "task-arithmetic/ties: scale of each task vector, default 1)")
    parser.add_argument("--base", help="the common base model (task-arithmetic, ties)")
    parser.add_argument("--t", type=float, default=0.5, help="slerp: 0 gives the first model, 1 the second")
    parser.add_argument("--density", type=float, default=1.0,
                        help="ties: fraction of each task vector's largest entries kept (0, 1]")
    parser.add_argument("--tokenizer", help="the model (one of the merged ones) whose tokenizer to keep; "
                        "needed when they differ")
    parser.add_argument("--out", required=True, help="the merged model's directory")
    parser.add_argument("--force", action="store_true", help="replace a previous output at --out (never "
                        "anything else: a folder holding other files, or the input, is refused)")


def run(args) -> int:
    out = merge(args.models, args.out, method=args.method, weights=args.weights, base=args.base, t=args.t,
                density=args.density, tokenizer=args.tokenizer, overwrite=args.force)
    print(f"merged {len(args.models)} models ({args.method}) -> {out}")
    return 0
