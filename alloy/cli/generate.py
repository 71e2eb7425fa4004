"""`alloy generate`: continue a prompt with a model, streaming the text to stdout.

One device by default; `--devices` plans a layer split over this machine's (or a declared
inventory's) devices by measured speed and memory, `--plan` reuses a plan made with
`alloy plan --task infer`, and `--processes` runs each stage as its own torch.distributed rank.
"""

from __future__ import annotations

import json
import sys
import time

from alloy.errors import ConfigError


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory (config.json, safetensors, tokenizer.json)")
    parser.add_argument("--prompt", required=True, help="text to continue (the user message with --chat)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (the default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 means off")
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--dtype", default="fp32", help="weights in fp32, bf16, int8 (per-channel) or a GGUF block format q8_0, q4_0, q4_1, q4_k (head in q8_0; on a GPU the blocks stay in memory and PyTorch decodes them). On CPU Alloy's kernels stream the smaller weights: int8 multiplies in fp32, bf16 rounds each matmul's input to bf16 and sums in fp32 (as llama.cpp's BF16), the block formats take int8 dot products; on GPU bf16/int8 compute in bf16 (default fp32)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--devices", default=None,
                        help="'auto' (this machine, measured) or an inventory JSON: plan a layer split over them")
    parser.add_argument("--plan", default=None, help="a plan JSON from `alloy plan --task infer`")
    parser.add_argument("--processes", action="store_true",
                        help="run each stage as a torch.distributed process (always, for a plan that places a "
                             "MoE model's experts apart from attention)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    parser.add_argument("--lora", default=None, help="a LoRA adapter directory (PEFT format) to apply to the model")


def plan_stages(args, spec, prompt_len: int, new_tokens: int):
    """(stages, plan or None) from --plan, --devices or neither (one CPU stage); shared with serve."""
    from alloy.infer.partition import StageSpec, stages_from_plan

    if args.plan and args.devices:
        raise ConfigError("give --plan or --devices, not both")
    if args.plan:
        from alloy.plan import Plan

        plan = Plan.load(args.plan)
        return stages_from_plan(plan), plan
    if args.devices:
        from alloy.cli.plan import load_devices
        from alloy.infer.optimize import decode_inventory
        from alloy.infer.optimize import QUANT_FORMATS
        from alloy.plan import Workload, make_plan

        # The planner knows byte widths, not block formats: plan a block format as int8 (1 byte a
        # weight, an upper bound on Q8_0's 1.06 and a safe overestimate for the 4-bit ones).
        plan_dtype = "int8" if args.dtype in QUANT_FORMATS else args.dtype
        work = Workload(task="infer", batch_size=1, seq_len=prompt_len, dtype=plan_dtype, new_tokens=new_tokens)
        plan = make_plan(spec, decode_inventory(load_devices(args.devices), plan_dtype), work)
        return stages_from_plan(plan), plan
    return [StageSpec("cpu", (0, spec.num_layers), True, True)], None


def run(args) -> int:
    import alloy
    from alloy.infer.generate import stream, validate
    from alloy.infer.load import load_for_decoding
    from alloy.infer.optimize import decode_dtype
    from alloy.infer.partition import Pipeline
    from alloy.infer.sampling import Sampling
    from alloy.infer.tokenize import TextStream, encode, require_tokenizer

    if args.lora:  # the adapter folded into a merged copy of the model, which every path below loads
        from alloy.checkpoint.lora import merged_model_dir

        args.model = str(merged_model_dir(args.model, args.lora))
    dtype = decode_dtype(args.dtype)
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                        repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.prompt:
        raise ConfigError("the prompt is empty")
    # The tokenizer and templates, without any weights: a slice of no layers, no embeddings, no head.
    text_side = alloy.load(args.model, layers=(0, 0), embed=False, head=False)
    ids = encode(text_side, args.prompt, chat=args.chat, system=args.system)
    tokenizer = require_tokenizer(text_side)
    spec = text_side.spec
    validate(spec, [ids], args.max_new_tokens)
    stages, _ = plan_stages(args, spec, len(ids), args.max_new_tokens)

    started = time.perf_counter()
    # experts placed apart from attention run on ranks of their own: one process cannot hold them apart
    if args.processes or any(stage.experts is not None for stage in stages):
        from alloy.infer.distributed import generate_distributed

        generating = time.perf_counter()  # the workers load and generate inside this call
        tokens = generate_distributed(args.model, stages, [ids], max_new_tokens=args.max_new_tokens,
                                      sampling=sampling, dtype=dtype)[0]
        steps = iter(tokens)
    elif len(stages) == 1:
        model = load_for_decoding(args.model, dtype, device=stages[0].device)
        generating = time.perf_counter()  # tokens/s counts generating, not loading
        steps = (int(t[0]) for t in stream(model, [ids], max_new_tokens=args.max_new_tokens, sampling=sampling))
    else:
        pipe = Pipeline.load(args.model, stages, dtype=dtype)
        generating = time.perf_counter()
        steps = (int(t[0]) for t in stream(pipe, [ids], max_new_tokens=args.max_new_tokens, sampling=sampling))

    text = TextStream(tokenizer, args.stop)
    eos = set(spec.eos_token_id)
    generated, finish = [], "length"
    for token in steps:
        generated.append(token)
        if token in eos:
            finish = "eos"
            break
        piece = text.push(token)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
        if text.stopped:
            finish = "stop"
            break
    tail = text.flush()
    finished = time.perf_counter()
    elapsed = finished - started
    tokens_per_s = len(generated) / max(finished - generating, 1e-9)
    if args.json:
        print(json.dumps({"prompt_tokens": len(ids), "tokens": generated, "text": tokenizer.decode(generated)
                          if finish != "stop" else _until_stop(tokenizer.decode(generated), args.stop),
                          "finish_reason": finish, "dtype": dtype, "seconds": round(elapsed, 4),
                          "tokens_per_s": round(tokens_per_s, 2),
                          "stages": [{"device": s.device, "layers": list(s.layers)} for s in stages]}))
    else:
        sys.stdout.write(tail + "\n")
        sys.stdout.flush()  # the text first, then the rate, when both go to one terminal
        print(f"({len(generated)} tokens, {tokens_per_s:.1f} tokens/s)", file=sys.stderr)
    return 0


def _until_stop(text: str, stop: list[str]) -> str:
    cuts = [text.find(s) for s in stop if s in text]
    return text[:min(cuts)] if cuts else text
