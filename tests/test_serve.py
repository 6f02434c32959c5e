"""tools/serve.py: the real server (uvicorn in a subprocess on a free port) called with the official openai
client and with plain HTTP (httpx). Replies equal megagpt's generate for the same prompt (token ids and
text), streaming adds up to the non-streaming reply, 16 concurrent clients all get their own correct reply,
a client killed mid-stream does not wedge the server, bad requests get a 4xx with one line, and a TP2 x PP2
server (four ranks in lockstep) serves the one-process tokens."""
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from megagpt.checkpoint.sharded import save_checkpoint  # noqa: E402
from megagpt.config import Config, DataConfig, ModelConfig, ParallelConfig, TrainConfig  # noqa: E402
from megagpt.data.tokenizer import Tokenizer  # noqa: E402
from megagpt.generate import generate_ids  # noqa: E402
from megagpt.loading import load_for_generation  # noqa: E402
from megagpt.openai_api import chat_template  # noqa: E402
from megagpt.parallel.spawn import free_port  # noqa: E402
from megagpt.parallel.state import ParallelState  # noqa: E402
from megagpt.pipeline.split import build_stage  # noqa: E402
from megagpt.sampling import Sampling  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE = os.path.join(ROOT, "tools", "serve.py")
MODEL = dict(vocab_size=300, max_seq_len=256, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
             ffn_hidden_size=96, make_vocab_divisible_by=1, init_std=0.1, use_flash_attn=False)
TEXT = "to be or not to be, that is the question"
NAME = "tiny"
TIMEOUT = 60.0                                   # every client call is bounded: a hang fails, never blocks


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tok_path = str(root / "tokenizer.json")
    Tokenizer.train([TEXT] * 20, vocab_size=280).save(tok_path)
    cfg = Config(model=ModelConfig(**MODEL), parallel=ParallelConfig(), data=DataConfig(tokenizer=tok_path),
                 train=TrainConfig(seq_len=256, micro_batch_size=1, global_batch_size=1))
    ps = ParallelState.single()
    run_dir = str(root / "run")
    save_checkpoint(run_dir, 1, build_stage(cfg, ps, seed=1234), ps, cfg, {})
    chunks, _, tok, eod = load_for_generation(run_dir)
    return {"run": run_dir, "chunks": chunks, "tok": tok, "eod": eod}


def _start(ckpt, world: int = 1, tp: int = 1, pp: int = 1):
    """The server's ranks as subprocesses (rank 0 on a free port); returns (base url, processes)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in range(world):
        if world > 1:
            env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, SERVE, "--load", ckpt["run"], "--port", "0", "--model-name",
                                       NAME, "--tp", str(tp), "--pp", str(pp), "--heartbeat", "1"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    first = []
    reader = threading.Thread(target=lambda: first.append(procs[0].stdout.readline()), daemon=True)
    reader.start()
    reader.join(180)
    assert first and first[0].startswith("serve: model"), (first, procs[0].poll())
    url = first[0].split(" on ")[1].split()[0]                     # http://127.0.0.1:PORT/v1
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url[:-3] + "/health", timeout=5).status_code == 200:
                return url, procs
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "the server never answered /health"
            time.sleep(0.2)


def _stop(procs) -> list[int]:
    procs[0].send_signal(signal.SIGTERM)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=60))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


@pytest.fixture(scope="module")
def server(ckpt):
    url, procs = _start(ckpt)
    yield url
    codes = _stop(procs)
    assert codes == [0], procs[0].stderr.read()[-2000:]


def _client(url):
    return openai.OpenAI(base_url=url, api_key="dummy", timeout=TIMEOUT, max_retries=0)


def _want(ckpt, prompt_ids, max_tokens, sampling=None, n=1, stop=()):
    """megagpt's generate for the same request: (ids, text) per choice."""
    tok, eod = ckpt["tok"], ckpt["eod"]
    rule = (lambda g: any(s in tok.decode(g) for s in stop)) if stop else None
    rows = generate_ids(ckpt["chunks"], [prompt_ids], max_tokens, sampling, eod_id=eod, stop=rule, num_samples=n)
    out = []
    for ids in rows:
        text = tok.decode(ids[:-1] if ids and ids[-1] == eod else ids)
        cuts = [text.find(s) for s in stop if s in text]
        out.append((ids, text[:min(cuts)] if cuts else text))
    return out


def test_models_health_and_greedy_equals_generate(ckpt, server):
    client = _client(server)
    assert [m.id for m in client.models.list().data] == [NAME]
    health = httpx.get(server[:-3] + "/health", timeout=TIMEOUT).json()
    assert health["status"] == "ok" and health["model"] == NAME
    prompt = "to be or"
    (ids, text), = _want(ckpt, ckpt["tok"].encode(prompt), 12)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0,
                                  extra_body={"return_token_ids": True})
    c = r.choices[0]
    assert c.token_ids == ids and c.text == text
    assert c.finish_reason == ("stop" if ids[-1] == ckpt["eod"] else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ckpt["tok"].encode(prompt)), len(ids))
    # plain HTTP, token-id prompts, a batch of two prompts
    body = {"model": NAME, "prompt": [[3, 141, 59, 26, 5], [7, 7]], "max_tokens": 9, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    got = httpx.post(server + "/completions", json=body, timeout=TIMEOUT).json()
    want = generate_ids(ckpt["chunks"], body["prompt"], 9)
    assert [c["token_ids"] for c in got["choices"]] == want and [c["index"] for c in got["choices"]] == [0, 1]
    assert got["usage"] == {"prompt_tokens": 7, "completion_tokens": 18, "total_tokens": 25}


def test_seeded_sampling_and_n(ckpt, server):
    client = _client(server)
    prompt = ckpt["tok"].encode("that is")
    sampling = Sampling(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, seed=4)
    want = _want(ckpt, prompt, 10, sampling, n=3)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0.8, top_p=0.9, seed=4, n=3,
                                  extra_body={"top_k": 40, "return_token_ids": True})
    assert [(c.token_ids, c.text) for c in r.choices] == want
    assert r.usage.completion_tokens == sum(len(ids) for ids, _ in want)


def _stop_string(ckpt, prompt_ids):
    """A stop string that cuts the greedy output short: a character of its decoded text past the start."""
    (ids, text), = _want(ckpt, prompt_ids, 30)
    visible = [ch for ch in text[3:] if not ch.isspace()]
    assert visible, text
    return visible[0]


def test_stream_equals_non_stream(ckpt, server):
    client = _client(server)
    prompt = "to be or"
    stop = _stop_string(ckpt, ckpt["tok"].encode(prompt))
    (ids, text), = _want(ckpt, ckpt["tok"].encode(prompt), 30, stop=[stop])
    for max_tokens in (30, 4):                      # stopped by the stop string, then by max_tokens
        kw = dict(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, stop=[stop])
        whole = client.completions.create(**kw).choices[0]
        pieces, reasons = [], []
        for ev in client.completions.create(**kw, stream=True):
            pieces.append(ev.choices[0].text)
            reasons.append(ev.choices[0].finish_reason)
        assert "".join(pieces) == whole.text and reasons[-1] == whole.finish_reason
        assert reasons[:-1] == [None] * (len(reasons) - 1)
        if max_tokens == 30:
            assert whole.text == text and whole.finish_reason == "stop" and stop not in whole.text
    # chat: the template's prompt, streamed deltas add up to the message; usage in the last chunk
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "to be?"}]
    prompt_ids, stops, _ = chat_template(ckpt["tok"], messages)
    (ids, text), = _want(ckpt, prompt_ids, 20, stop=stops)
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    assert whole.choices[0].message.content == text and whole.usage.completion_tokens == len(ids)
    events = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events if e.choices) == text
    assert events[-1].usage.completion_tokens == len(ids) and events[-1].choices == []
    raw = httpx.post(server + "/chat/completions", json={"model": NAME, "messages": messages, "max_tokens": 3,
                                                         "stream": True}, timeout=TIMEOUT).text
    assert raw.rstrip().endswith("data: [DONE]") and all(b.startswith("data: ") for b in raw.strip().split("\n\n"))


def test_sixteen_concurrent_clients(ckpt, server):
    prompts = [[(7 * i + j) % 250 + 1 for j in range(1 + i % 5)] for i in range(16)]
    wants = [generate_ids(ckpt["chunks"], [p], 4 + i % 6)[0] for i, p in enumerate(prompts)]

    def one(i):
        kw = dict(model=NAME, prompt=prompts[i], max_tokens=4 + i % 6, temperature=0, extra_body={
            "return_token_ids": True, "ignore_eos": True})
        if i % 2:                                  # half of them stream
            return [c.choices[0].text for c in _client(server).completions.create(**kw, stream=True)]
        return _client(server).completions.create(**kw).choices[0].token_ids
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(16)]
        got = [f.result(timeout=2 * TIMEOUT) for f in futures]
    for i, g in enumerate(got):
        if i % 2:
            assert "".join(g) == ckpt["tok"].decode(wants[i]), i
        else:
            assert g == wants[i], i


def test_killed_client_does_not_wedge(ckpt, server):
    before = httpx.get(server[:-3] + "/health", timeout=TIMEOUT).json()["cancelled"]
    code = ("import httpx, sys\n"
            f"with httpx.stream('POST', {server + '/completions'!r}, timeout=60, json={{'model': {NAME!r}, "
            "'prompt': [5, 6], 'max_tokens': 250, 'temperature': 0, 'ignore_eos': True, 'stream': True}) as r:\n"
            "    for line in r.iter_lines():\n"
            "        print(line, flush=True)\n")
    client = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    first = client.stdout.readline()
    client.kill()                                  # mid-stream: 250 tokens take far longer than this
    client.wait(timeout=TIMEOUT)
    assert first.startswith("data: {"), first
    deadline = time.monotonic() + TIMEOUT
    while httpx.get(server[:-3] + "/health", timeout=TIMEOUT).json()["cancelled"] == before:
        assert time.monotonic() < deadline, "the server never noticed the client was gone"
        time.sleep(0.1)
    r = _client(server).completions.create(model=NAME, prompt=[5, 6], max_tokens=3, temperature=0,
                                           extra_body={"return_token_ids": True, "ignore_eos": True})
    assert r.choices[0].token_ids == generate_ids(ckpt["chunks"], [[5, 6]], 3)[0]


GOOD = {"model": NAME, "prompt": "to be", "max_tokens": 4}


@pytest.mark.parametrize("change,status,message", [
    ({"model": None}, 400, "model: missing"),
    ({"model": "gpt-4"}, 404, "model: 'gpt-4' is not served here (this server serves 'tiny')"),
    ({"prompt": None}, 400, "prompt: missing"),
    ({"prompt": 5}, 400, "prompt: expected a string, a list of strings"),
    ({"prompt": []}, 400, "prompt: expected a string"),
    ({"max_tokens": "4"}, 400, "max_tokens: expected a positive integer, got '4'"),
    ({"max_tokens": 0}, 400, "max_tokens: expected a positive integer, got 0"),
    ({"prompt": [1, 2], "max_tokens": 255}, 400,
     "max_tokens: the prompt's 2 tokens + max_tokens=255 exceed the model's context of 256 tokens (nothing is"),
    ({"prompt": [1] * 256, "max_tokens": 1}, 400, "max_tokens: the prompt's 256 tokens + max_tokens=1 exceed"),
    ({"top_p": 1.5}, 400, "top_p: expected a number in (0, 1], got 1.5"),
    ({"top_p": 0}, 400, "top_p: expected a number in (0, 1], got 0"),
    ({"temperature": -0.1}, 400, "temperature: expected a number >= 0, got -0.1"),
    ({"temperature": "hot"}, 400, "temperature: expected a number >= 0, got 'hot'"),
    ({"n": 17}, 400, "n: 17 choices x 1 prompts exceed the server's limit of 16"),
    ({"n": 0}, 400, "n: expected a positive integer, got 0"),
    ({"stop": ["a", ""]}, 400, "stop: expected a non-empty string or a list of up to 4 of them"),
    ({"prompt": [1, 300]}, 400, "prompt: token id 300 is outside the vocabulary of 300"),
    ({"stream": "yes"}, 400, "stream: expected true or false, got 'yes'"),
    ({"logprobs": 3}, 400, "logprobs: not supported by this server"),
    ({"seed": 1.5}, 400, "seed: expected an integer, got 1.5"),
])
def test_bad_requests_get_one_line(server, change, status, message):
    body = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    r = httpx.post(server + "/completions", json=body, timeout=TIMEOUT)
    err = r.json()["error"]
    assert r.status_code == status and err["message"].startswith(message) and "\n" not in err["message"], err


def test_bad_bodies_and_chat_fields(server):
    r = httpx.post(server + "/completions", content=b"{not json", timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("body: expected a JSON object")
    for messages, message in [(None, "messages: missing"), ([], "messages: expected a non-empty list"),
                              ([{"role": "robot", "content": "hi"}], "messages[0]: expected {\"role\": one of"),
                              ([{"role": "user", "content": TEXT * 30}], "messages: the prompt's"),
                              ([{"role": "user", "content": [{"type": "image"}]}], "messages[0].content: expected")]:
        body = {"model": NAME, **({} if messages is None else {"messages": messages})}
        r = httpx.post(server + "/chat/completions", json=body, timeout=TIMEOUT)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith(message), r.text
    with pytest.raises(openai.BadRequestError, match="top_p: expected a number in"):
        _client(server).completions.create(model=NAME, prompt="to be", top_p=2.0)


def test_startup_errors(ckpt, tmp_path, capsys, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import serve as tool
    assert tool.main(["--load", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err == f"serve: --load: {tmp_path / 'nothing'}: no such checkpoint directory\n"
    assert tool.main(["--load", ckpt["run"], "--max-n", "0"]) == 2
    assert capsys.readouterr().err == "serve: --max-n: expected a positive integer, got 0\n"
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert tool.main(["--load", ckpt["run"], "--tp", "2"]) == 2
    assert capsys.readouterr().err.startswith("serve: --tp/--pp: the server runs one replica, so the world size 4 "
                                              "must equal tp*pp=2*1")


def test_streamed_text_adds_up():
    """RowText holds back a partial UTF-8 character and a tail that may begin a stop string, so the pieces
    are always a prefix of the final text, which ends before the stop string."""
    from megagpt.serving import RowText
    data = "caf\u00e9 na\u00efve STO  STOP after".encode()             # multi-byte characters, a false start
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")   # noqa: E731 -- one id per byte
    for stops, want in ((["STOP"], "caf\u00e9 na\u00efve STO  "), ([], data.decode()), (["\u00e9 n"], "caf")):
        row, pieces = RowText(decode, stops, end_ids=set()), []
        for b in data:
            pieces.append(row.push(b))
            assert "\ufffd" not in "".join(pieces) and want.startswith("".join(pieces))
            if any(s in decode(row.ids) for s in stops):
                break
        pieces.append(row.close("stop"))
        assert "".join(pieces) == row.text() == want


def _request(ckpt, body):
    from megagpt.openai_api import parse_request
    return parse_request("completion", {"model": NAME, **body}, ckpt["tok"], model=NAME, context=256, vocab=300,
                         max_n=16)


def test_greedy_requests_batch_and_match_alone(ckpt):
    """The engine in-process: waiting greedy requests with different prompts, lengths, max_tokens, stop
    strings and n run as one batch, and each gets what megagpt's generate gives it alone; a sampled request
    and one with another repetition penalty wait for their own turn."""
    from megagpt.parallel.state import ParallelState
    from megagpt.serving import Engine
    tok = ckpt["tok"]
    stop = _stop_string(ckpt, tok.encode("to be or"))
    bodies = [dict(prompt="to be or", max_tokens=30, temperature=0, stop=[stop]),
              dict(prompt=[[9, 8, 7, 6, 5, 4, 3], [1]], max_tokens=5, temperature=0, ignore_eos=False),
              dict(prompt="question", max_tokens=12, temperature=0, n=2),
              dict(prompt="that is", max_tokens=6, temperature=0.7, seed=3),         # sampled: alone
              dict(prompt="be", max_tokens=7, temperature=0, repetition_penalty=1.3)]  # another penalty
    engine = Engine(ckpt["chunks"], ParallelState.single(), tok, ckpt["eod"], max_batch=8)
    jobs = [engine.submit(_request(ckpt, b), None) for b in bodies]
    batches = []
    while engine.backlog or not engine.jobs.empty():
        batches.append(engine.next_batch())
        engine.run_batch(batches[-1])
    assert [[jobs.index(j) for j in b] for b in batches] == [[0, 1, 2], [3], [4]]
    for job, body in zip(jobs, bodies):
        req = job.req
        deltas = {}
        while True:
            kind, *rest = job.events.get_nowait()
            if kind == "done":
                break
            deltas[rest[0]] = deltas.get(rest[0], "") + rest[1]
        sampling = req.sampling if req.sampling.do_sample else \
            Sampling(repetition_penalty=req.sampling.repetition_penalty)
        want = [w for p in req.prompts for w in _want(ckpt, p, req.max_tokens, sampling, n=req.n, stop=req.stop)]
        assert [(r["ids"], r["text"]) for r in rest[0]] == want, body
        assert [deltas[i] for i in range(len(want))] == [t for _, t in want]
    assert jobs[0].rows[0].finish == "stop" and stop not in jobs[0].rows[0].text()     # the stop string cut it


def test_failed_generation_reaches_its_client_and_the_server_goes_on(ckpt):
    from megagpt.parallel.state import ParallelState
    from megagpt.serving import Engine
    engine = Engine(ckpt["chunks"], ParallelState.single(), ckpt["tok"], ckpt["eod"])
    broken = _request(ckpt, dict(prompt=[1, 2], max_tokens=3, temperature=0))
    broken.prompts = [[1, 10 ** 6]]                              # past the checks: the embedding fails
    jobs = [engine.submit(broken, None), engine.submit(_request(ckpt, dict(prompt=[1, 2], max_tokens=3,
                                                                            temperature=0.5)), None)]
    for _ in jobs:
        engine.run_guarded(engine.next_batch())
    kind, message = jobs[0].events.get_nowait()
    assert kind == "error" and message.startswith("generation failed: IndexError") and "\n" not in message
    assert jobs[1].events.get_nowait()[0] == "delta" and engine.stats["failed"] == 1 and engine.dead is None


def test_tp2_pp2_followers_in_lockstep(ckpt):
    """Four ranks (TP2 x PP2, the checkpoint resharded on load) serve the one-process tokens, also when
    requests arrive together (batched or queued); stopping rank 0 stops the followers too."""
    url, procs = _start(ckpt, world=4, tp=2, pp=2)
    try:
        sampled = dict(temperature=0.9, top_p=0.95, seed=7)
        bodies = [dict(prompt=[3, 141, 59, 26, 5], max_tokens=8, temperature=0),
                  dict(prompt=[[9, 8, 7], [1]], max_tokens=6, temperature=0),
                  dict(prompt=[11, 12], max_tokens=8, n=2, **sampled)]
        wants = [generate_ids(ckpt["chunks"], [[3, 141, 59, 26, 5]], 8),
                 generate_ids(ckpt["chunks"], [[9, 8, 7], [1]], 6),
                 generate_ids(ckpt["chunks"], [[11, 12]], 8, Sampling(do_sample=True, **sampled), num_samples=2)]

        def one(body):
            r = httpx.post(url + "/completions", timeout=TIMEOUT, json={
                "model": NAME, "return_token_ids": True, "ignore_eos": True, **body})
            return [c["token_ids"] for c in r.json()["choices"]]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            got = list(pool.map(one, bodies, timeout=2 * TIMEOUT))
        assert got == wants
        # a stop string ends the request on rank 0 before the followers' own loops would end: all leave together
        stop = _stop_string(ckpt, ckpt["tok"].encode("to be or"))
        (_, text), = _want(ckpt, ckpt["tok"].encode("to be or"), 30, stop=[stop])
        stopped = httpx.post(url + "/completions", timeout=TIMEOUT, json={
            "model": NAME, "prompt": "to be or", "max_tokens": 30, "temperature": 0, "stop": [stop]}).json()
        assert (stopped["choices"][0]["text"], stopped["choices"][0]["finish_reason"]) == (text, "stop")
        stream = httpx.post(url + "/completions", timeout=TIMEOUT, json={"model": NAME, "stream": True,
                                                                          "ignore_eos": True, **bodies[0]}).text
        texts = [json.loads(b[6:])["choices"][0]["text"] for b in stream.strip().split("\n\n")[:-1]]
        assert "".join(texts) == ckpt["tok"].decode(wants[0][0])
    finally:
        codes = _stop(procs)
    assert codes == [0] * 4, [p.stderr.read()[-2000:] for p in procs]


def test_chat_template_is_the_aligned_one_when_the_tokenizer_has_chat_tokens():
    """An SFT model's tokenizer (align/chat.py's tokens) gets apply_chat_template and stops at <|end|>;
    a plain tokenizer gets the System:/User:/Assistant: fallback."""
    from megagpt.align.chat import END_TOKEN, add_chat_tokens, apply_chat_template
    from megagpt.data.tokenizer import Tokenizer
    base = Tokenizer.train([f"{a}+{b}={a + b} be brief" for a in range(20) for b in range(20)], 300)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+3"}]
    tok = add_chat_tokens(base)
    ids, stops, stop_ids = chat_template(tok, messages)
    assert ids == apply_chat_template(tok, messages, add_generation_prompt=True, require_assistant=False)[0]
    assert stops == [] and stop_ids == [tok.token_id(END_TOKEN)]
    ids, stops, stop_ids = chat_template(base, messages)
    assert ids == base.encode("System: be brief\nUser: 2+3\nAssistant:") and stop_ids == [] and "\nUser:" in stops
