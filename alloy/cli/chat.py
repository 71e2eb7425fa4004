"""`alloy chat MODEL`: talk to a model in the terminal.

Each answer streams as it is generated and ends with its tokens/s. The conversation is kept and
rendered with the model's chat template every turn. Commands: /reset (forget the conversation),
/system TEXT (set the system message and reset), /exit (or Ctrl-D).
"""

from __future__ import annotations

import queue
import sys
import time

from alloy.errors import ConfigError

HELP = "commands: /reset, /system TEXT, /exit"


def add_arguments(parser) -> None:
    parser.add_argument("model", help="HF model directory with a tokenizer and a chat template")
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest answer (default 512)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (the default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dtype", default="fp32", help="weights in fp32, bf16 or int8 (default fp32)")
    parser.add_argument("--devices", default=None, help="'auto' or an inventory JSON: split the layers over them")
    parser.add_argument("--plan", default=None, help="a plan JSON from `alloy plan --task infer`")
    parser.add_argument("--ctx-size", type=int, default=None, help="context (default: the model's)")


def run(args) -> int:
    import alloy
    from alloy.cli.serve import _stages
    from alloy.infer.sampling import Sampling
    from alloy.checkpoint.io import chat_template
    from alloy.infer.tokenize import apply_chat_template, eos_ids, require_tokenizer
    from alloy.serve.engine import Engine, Request

    from alloy.checkpoint.hub import display_name, existing_model

    directory = existing_model(args.model)  # a folder, a GGUF file, or a hub id in the local cache
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    text_side = alloy.load(directory, layers=(0, 0), embed=False, head=False)
    tokenizer = require_tokenizer(text_side)
    if not text_side.spec.causal:
        raise ConfigError(f"{args.model} is an encoder; it does not generate text")
    if not chat_template(text_side):
        raise ConfigError(f"{args.model} has no chat template; use `alloy generate` for plain continuation")
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    args.max_batch, args.max_queue = 1, 0
    stages, lines = _stages(args, directory, text_side.spec)
    engine = Engine(stages, tokenizer=tokenizer, max_batch=1, max_queue=1, ctx_size=args.ctx_size).start()
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    system = args.system
    history: list[dict] = []
    print(f"alloy chat: {display_name(args.model, directory)} ({'; '.join(lines)}). {HELP}")
    try:
        while True:
            try:
                line = input("> ")
            except EOFError:
                print()
                break
            if not line.strip():
                continue
            if line.strip() in ("/exit", "/quit"):
                break
            if line.strip() == "/reset":
                history = []
                print("(conversation cleared)")
                continue
            if line.startswith("/system"):
                system, history = line[len("/system"):].strip() or None, []
                print(f"(system message {'set' if system else 'cleared'}; conversation cleared)")
                continue
            if line.startswith("/"):
                print(f"unknown command {line.split()[0]}; {HELP}")
                continue
            history.append({"role": "user", "content": line})
            messages = ([{"role": "system", "content": system}] if system else []) + history
            prompt = tokenizer.encode(apply_chat_template(text_side, messages), add_special_tokens=False).ids
            room = engine.ctx_size - len(prompt)
            if room < 1:
                history.pop()
                print(f"(the conversation fills the {engine.ctx_size}-token context; /reset to start over)")
                continue
            events: queue.Queue = queue.Queue()
            started = time.perf_counter()
            engine.submit(Request(prompt=prompt, max_tokens=min(args.max_tokens, room), sampling=sampling,
                                  eos_ids=frozenset(eos_ids(text_side))), events.put)
            answer, count = [], 0
            while True:
                event = events.get()
                if event.token is not None:
                    count += 1
                    answer.append(event.text)
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                if event.finish_reason is not None:
                    break
            elapsed = time.perf_counter() - started
            history.append({"role": "assistant", "content": "".join(answer)})
            print(f"\n({count} tokens, {count / elapsed:.1f} tokens/s)")
    finally:
        engine.stop()
    return 0
