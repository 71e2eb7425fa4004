"""python -m bench NAME [--quick] [--json] [--reps N]: one benchmark, side by side with its baseline.

Writes every raw sample with the machine, versions and commit to bench/results/NAME-*.json and
prints a Markdown table (or, with --json, one object with the headline figures and the samples).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from bench import harness

BENCHMARKS = {
    "train": "training step tokens/s vs. transformers, fp32 and bf16, one device",
    "hetero": "3 CPU workers at 100/50/25%: Alloy's plan vs. equal split vs. the solo sum",
    "decode": "decode tokens/s vs. transformers generate: fp32, bf16, int8, batch 1 and 8; roofline fraction",
    "quality": "held-out perplexity of a small trained model at fp32, bf16, int8 and the GGUF block formats, vs llama.cpp (or gguf-py) on the same file",
    "plan": "planner runtime at 8/64/256 declared devices; predicted gains on the example clusters",
    "serve": "OpenAI-compatible server vs. llama.cpp's, same GGUF-exported weights: tokens/s, TTFT, ITL at 1/4/16 clients",
    "moe": "MoE decode on two emulated devices: the planner's expert placement vs. layer-only splits, predicted and measured",
    "lora": "LoRA training tokens/s vs full fine-tuning and transformers+PEFT, fp32 and bf16",
    "validate": "planner fidelity: cost model and planner vs. published heterogeneous-cluster measurements",
}


def machine_flops() -> dict[str, float]:
    """This machine's measured sustained matmul FLOP/s per dtype (the devices profile, cached)."""
    try:
        from alloy.devices.local import profile

        cpu = next(d for d in profile().devices if d.kind == "cpu")
        return dict(cpu.matmul_flops)
    except Exception as err:  # the benchmark still runs; MFU is left out
        print(f"(no devices profile: {err}; MFU left out)", file=sys.stderr)
        return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(BENCHMARKS) + ["all"])
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes: each benchmark under a minute")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--reps", type=int, default=None, help="alternating rounds (default 3, quick 1)")
    parser.add_argument("--matrix", action="store_true",
                        help="hetero only: every scenario (quotas, core sets, sizes, batches, memory-bound), one table")
    args = parser.parse_args(argv)
    if args.matrix:
        return run_matrix(args)
    names = sorted(BENCHMARKS) if args.name == "all" else [args.name]
    reps = args.reps or (1 if args.quick else 3)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    outputs = {}
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        log(f"== {name}: {BENCHMARKS[name]} ({'quick' if args.quick else 'full'}, "
            f"{getattr(module, 'ROUNDS', None) or reps} rounds)")
        # a deterministic benchmark (no timing) says so with ROUNDS = 1: repeating it adds nothing
        rounds = getattr(module, "ROUNDS", None) or reps
        warmup = 0 if args.quick or getattr(module, "ROUNDS", None) else 1
        samples = harness.alternate(name, module.variants(args.quick), rounds, warmup=warmup, log=log,
                                    may_crash=getattr(module, "MAY_CRASH", ()))
        summary = harness.summarize(samples, module.PAIRS)
        headline = module.headline(summary, machine_flops())
        record = {"benchmark": name, "quick": args.quick, "environment": harness.environment(),
                  "headline": headline, **summary, "samples": samples}
        path = harness.save(name, record)
        outputs[name] = record
        log(harness.markdown(name, summary))
        if hasattr(module, "report"):  # a benchmark with more to show than figures (validate's metric table)
            log(module.report(samples))
        log("headline: " + ", ".join(f"{k}={v:.4g}" for k, v in headline.items()))
        log(f"raw samples: {path}")
    if args.json:
        print(json.dumps(outputs[names[0]] if len(names) == 1 else outputs, indent=1))
    return 0


def run_matrix(args) -> int:
    if args.name != "hetero":
        print("--matrix is for the hetero benchmark", file=sys.stderr)
        return 2
    from bench import hetero

    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    environment = harness.environment()
    partial = harness.RESULTS_DIR / "hetero-matrix-partial.json"
    result = hetero.matrix(args.quick, log=log, progress=lambda rows: harness.RESULTS_DIR.mkdir(exist_ok=True) or
                           partial.write_text(json.dumps({"environment": environment, "rows": rows}, indent=1)))
    record = {"benchmark": "hetero-matrix", "quick": args.quick, "environment": environment, **result}
    path = harness.save("hetero-matrix", record)
    log(hetero.matrix_markdown(result))
    log(f"raw results: {path}")
    if args.json:
        print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
