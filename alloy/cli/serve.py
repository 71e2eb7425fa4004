"""`alloy serve MODEL`: an OpenAI-compatible server with continuous batching.

Text models answer /v1/completions and /v1/chat/completions (the model's chat template); encoder
models (BERT family) answer /v1/embeddings. `--devices` / `--plan` split the layers over several
devices, as `alloy generate` does. Loopback only unless --host says otherwise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from alloy.errors import ConfigError


def add_arguments(parser) -> None:
    parser.add_argument("model", help="HF model directory (config.json, safetensors, tokenizer.json)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--name", default=None, help="the model id clients send (default: the directory's name)")
    parser.add_argument("--devices", default=None,
                        help="'auto' (this machine, measured) or an inventory JSON: plan a layer split over them")
    parser.add_argument("--plan", default=None, help="a plan JSON from `alloy plan --task infer`")
    parser.add_argument("--dtype", default="fp32", help="weights in fp32, bf16, int8 or a GGUF block format q8_0, q4_0, q4_1, q4_k (default fp32)")
    parser.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting for a batch row before new ones get 429 (default 64)")
    parser.add_argument("--ctx-size", type=int, default=None, help="context per request (default: the model's)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set ALLOY_API_KEY)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--processes", action="store_true",
                        help="run each stage of the split as its own torch.distributed process (rank 0 serves HTTP)")
    parser.add_argument("--nnodes", type=int, default=1,
                        help="machines the stages are spread over (implies --processes; run the same command on "
                             "each with its own --node-rank; node 0 serves HTTP)")
    parser.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0..nnodes-1")
    parser.add_argument("--rdzv-endpoint", default=None,
                        help="HOST:PORT on node 0 where the nodes meet (torchrun's static rendezvous)")
    parser.add_argument("--lora", default=None, help="a LoRA adapter directory (PEFT format) to apply to the model")


def load_server(args, *, start: bool = True):
    """(app, engine or None, description lines) for the arguments: the model loaded, the engine
    started in its own thread unless `start` is False (then run it with alloy.serve.app.serve)."""
    import alloy
    from alloy.serve.app import create_app

    from alloy.checkpoint.hub import display_name, existing_model

    directory = existing_model(args.model)  # a folder, a GGUF file, or a hub id in the local cache
    for name, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                             ("--port", args.port, 0)):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    name = args.name or display_name(args.model, directory)
    api_key = args.api_key or os.environ.get("ALLOY_API_KEY") or None
    text_side = alloy.load(directory, layers=(0, 0), embed=False, head=False)
    spec = text_side.spec
    if not spec.causal:  # an encoder: embeddings only
        model = alloy.load(directory)
        return create_app(model, model_name=name, api_key=api_key), None, [f"embeddings from {name} ({spec.family})"]
    stages, lines = _stages(args, directory, spec)
    from alloy.serve.engine import Engine

    engine = Engine(stages, tokenizer=text_side.tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                    ctx_size=args.ctx_size)
    if start:
        engine.start()
    app = create_app(text_side, model_name=name, engine=engine, api_key=api_key, plan_summary="; ".join(lines))
    app.router.on_shutdown.append(engine.stop)
    return app, engine, lines


def _stages(args, directory, spec):
    from alloy.cli.generate import plan_stages
    from alloy.infer.optimize import decode_dtype
    from alloy.infer.partition import Pipeline

    stages, plan = plan_stages(args, spec, prompt_len=min(spec.max_seq_len, args.ctx_size or 256) // 2,
                               new_tokens=64)
    models = Pipeline.load(directory, stages, dtype=decode_dtype(args.dtype)).stages
    lines = [f"layers {s.layers[0]}-{s.layers[1] - 1} on {s.device}" for s in stages]
    if plan is not None:
        lines.append(f"predicted {plan.predicted.tokens_per_s:.4g} tokens/s (batch {plan.batch_size})")
    return models, lines


def run(args) -> int:
    if args.lora:  # the adapter folded into a merged copy of the model, served under the base's name
        from alloy.checkpoint.hub import display_name, existing_model
        from alloy.checkpoint.lora import merged_model_dir

        args.name = args.name or display_name(args.model, existing_model(args.model))
        args.model = str(merged_model_dir(args.model, args.lora))

    if args.processes or args.nnodes > 1:
        return _run_processes(args)
    from alloy.serve.app import serve

    app, engine, lines = load_server(args, start=False)
    print(f"alloy serve: {args.name or Path(args.model).resolve().name} at http://{args.host}:{args.port}/v1")
    for line in lines:
        print(f"  {line}", flush=True)
    serve(app, engine, host=args.host, port=args.port)
    return 0


def _run_processes(args) -> int:
    """One process per stage (torchrun, gloo); rank 0 serves HTTP and drives the others."""
    import signal
    import tempfile

    import alloy
    from alloy.checkpoint.hub import display_name, existing_model
    from alloy.cli.generate import plan_stages
    from alloy.runtime.launch import Rendezvous
    from alloy.serve.remote import launch_server

    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise ConfigError(f"--node-rank must be in 0..{args.nnodes - 1} for --nnodes {args.nnodes}, "
                          f"got {args.node_rank}")
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise ConfigError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (an address of node 0 every node reaches)")

    directory = existing_model(args.model)  # a folder, a GGUF file, or a hub id in the local cache
    spec = alloy.load(directory, layers=(0, 0), embed=False, head=False).spec
    if not spec.causal:
        raise ConfigError("--processes serves text generation; an encoder runs in one process")
    stages, plan = plan_stages(args, spec, prompt_len=min(spec.max_seq_len, args.ctx_size or 256) // 2, new_tokens=64)
    if len(stages) < 2:
        raise ConfigError("--processes needs a split over several devices (--devices or --plan)")
    if len(stages) % args.nnodes:
        raise ConfigError(f"{len(stages)} stages do not split evenly over {args.nnodes} nodes")
    name = args.name or display_name(args.model, directory)
    per_node = len(stages) // args.nnodes
    lines = [f"rank {i}: layers {s.layers[0]}-{s.layers[1] - 1} on {s.device}"
             + (f" (node {i // per_node})" if args.nnodes > 1 else "") for i, s in enumerate(stages)]
    if plan is not None:
        lines.append(f"predicted {plan.predicted.tokens_per_s:.4g} tokens/s (batch {plan.batch_size})")
    if args.node_rank == 0:
        print(f"alloy serve: {name} at http://{args.host}:{args.port}/v1 ({len(stages)} processes"
              + (f" on {args.nnodes} nodes)" if args.nnodes > 1 else ")"))
    else:
        print(f"alloy serve: node {args.node_rank} of {args.nnodes}, ranks {args.node_rank * per_node}-"
              f"{(args.node_rank + 1) * per_node - 1}, joining {args.rdzv_endpoint}")
    for line in lines:
        print(f"  {line}", flush=True)
    # SIGTERM (docker stop, kill) ends the launcher through its cleanup, which stops every rank
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="alloy-serve-") as out_dir:
        job = {"model_dir": str(directory.resolve()), "dtype": args.dtype, "max_batch": args.max_batch,
               "max_queue": args.max_queue, "ctx_size": args.ctx_size, "host": args.host, "port": args.port,
               "name": name, "plan_summary": "; ".join(lines), "out_dir": out_dir}
        rdzv = Rendezvous(nnodes=args.nnodes, node_rank=args.node_rank, endpoint=args.rdzv_endpoint or "")
        launch_server(job, stages, args.api_key or os.environ.get("ALLOY_API_KEY") or None, rdzv)
    return 0
