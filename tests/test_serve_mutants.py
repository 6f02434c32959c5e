"""The server's rules without a model or a socket: parse_request's checks and boundaries, the engine's
batching, finish reasons, cancellation and failures (a scripted stand-in for generate.stream), and the
app's replies (FastAPI's TestClient). Each test kills mutants of megagpt/openai_api.py and
megagpt/serving.py that the end-to-end tests in tests/test_serve.py let live; all of it runs in a second."""
import asyncio
import json
import math
import threading
from types import SimpleNamespace

import pytest
import torch

from megagpt import serving
from megagpt.openai_api import APIError, GenRequest, chunk, new_id, parse_request, response, usage
from megagpt.parallel.state import ParallelState
from megagpt.sampling import Sampling

VOCAB, CONTEXT, EOD = 300, 64, 299
CFG = SimpleNamespace(max_seq_len=CONTEXT, vocab_size=VOCAB, image_token_id=None, audio_token_id=None)


class ByteTok:
    """One token per UTF-8 byte; ids past 255 decode as "<id>", so a kept end token shows in the text."""

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return b"".join(bytes([i]) if i < 256 else f"<{i}>".encode() for i in ids).decode("utf-8", "replace")


def request(body, kind="completion", max_n=4, model_cfg=None):
    return parse_request(kind, {"model": "m", **body}, ByteTok(), model="m", context=CONTEXT, vocab=VOCAB,
                         max_n=max_n, model_cfg=model_cfg)


# -- parse_request
@pytest.mark.parametrize("kind,change,message", [
    ("completion", {"temperature": math.inf}, "temperature: expected a number >= 0, got inf"),   # JSON 1e999
    ("completion", {"temperature": True}, "temperature: expected a number >= 0, got True"),
    ("completion", {"max_tokens": True}, "max_tokens: expected a positive integer, got True"),
    ("completion", {"prompt": [True, 2]}, "prompt: expected a string, a list of strings"),
    ("completion", {"prompt": [[1, 2], "ab"]}, "prompt: expected a string, a list of strings"),
    ("completion", {"prompt": ""}, "prompt: prompt 0 is empty"),
    ("completion", {"prompt": [-1, 2]}, "prompt: token id -1 is outside the vocabulary of 300"),
    ("completion", {"stop": ["a", "b", "c", "d", "e"]}, "stop: expected a non-empty string or a list of up to 4"),
    ("completion", {"top_k": -1}, "top_k: expected a non-negative integer, got -1"),
    ("completion", {"repetition_penalty": 0}, "repetition_penalty: expected a positive number, got 0"),
    ("completion", {"prompt": ["ab", "cd"], "n": 3}, "n: 3 choices x 2 prompts exceed the server's limit of 4"),
    ("completion", {"stream_options": {"include_usage": "yes"}}, "stream_options: expected"),
    ("completion", {"media": {"images": []}, "prompt": ["<image>"]}, "media: only with /v1/completions"),
    ("chat", {"media": {"images": []}, "prompt": "<image>"}, "media: only with /v1/completions"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "input_audio", "text": "hi"}]}]},
     "messages[0].content: expected a string or a list of text parts"),
])
def test_bad_fields_are_400_naming_the_field(kind, change, message):
    body = {"prompt": "to be", "max_tokens": 4} if kind == "completion" else \
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with pytest.raises(APIError) as e:
        request({**body, **change}, kind)
    assert e.value.status == 400 and e.value.message.startswith(message), e.value.message


def test_a_body_that_is_not_an_object_is_400():
    with pytest.raises(APIError, match="body: expected a JSON object") as e:
        parse_request("completion", ["to be"], ByteTok(), model="m", context=CONTEXT, vocab=VOCAB, max_n=4)
    assert e.value.status == 400


def test_context_boundaries_are_exact():
    """prompt + max_tokens == context fits; one more is refused, never truncated; a chat prompt that fills
    the context leaves no room at all."""
    assert request({"prompt": [1] * 4, "max_tokens": CONTEXT - 4}).max_tokens == CONTEXT - 4
    with pytest.raises(APIError, match="max_tokens: the prompt's 4 tokens") as e:
        request({"prompt": [1] * 4, "max_tokens": CONTEXT - 3})
    assert e.value.code == "context_length_exceeded"
    template = len("User: \nAssistant:")                            # the plain tokenizer's chat fallback
    fits = request({"messages": [{"role": "user", "content": "x" * (CONTEXT - template - 1)}]}, "chat")
    assert fits.max_tokens == 1
    with pytest.raises(APIError, match=f"messages: the prompt's {CONTEXT} tokens leave no room") as e:
        request({"messages": [{"role": "user", "content": "x" * (CONTEXT - template)}]}, "chat")
    assert e.value.code == "context_length_exceeded"


def test_n_limit_counts_rows_and_allows_the_limit():
    assert request({"prompt": "ab", "n": 4}).n == 4
    assert request({"prompt": ["ab", "cd"], "n": 2}).n == 2


def test_defaults_and_accepted_fields():
    req = request({"prompt": "to be", "presence_penalty": 0, "frequency_penalty": 0.0, "best_of": 1, "echo": False,
                   "logprobs": None, "user": "someone"})
    assert req.max_tokens == 16 and req.sampling.do_sample and req.sampling.temperature == 1.0
    assert not req.return_token_ids and not req.stream and not req.include_usage and req.stop == []
    seeds = {request({"prompt": "to be"}).sampling.seed for _ in range(4)}
    assert len(seeds) > 1                                           # unseeded: each request its own draws


def test_chat_max_completion_tokens_and_stop():
    """chat: max_completion_tokens wins over max_tokens unless it is null; completions have only max_tokens."""
    messages = [{"role": "user", "content": "hi"}]
    req = request({"messages": messages, "max_completion_tokens": 3, "max_tokens": 5, "stop": "Z"}, "chat")
    assert req.max_tokens == 3 and "Z" in req.stop and "\nUser:" in req.stop
    assert request({"messages": messages, "max_completion_tokens": None, "max_tokens": 5}, "chat").max_tokens == 5
    with pytest.raises(APIError, match="^max_tokens: expected a positive integer, got 0"):
        request({"prompt": "ab", "max_tokens": 0, "max_completion_tokens": 3})


def test_error_bodies_are_one_line_and_typed():
    assert APIError(400, "first\nsecond").message == "first"
    assert APIError(404, "x").body()["error"]["type"] == "invalid_request_error"
    assert APIError(500, "x").body()["error"]["type"] == "server_error"


def test_response_shapes():
    assert new_id("chat").startswith("chatcmpl-") and new_id("completion").startswith("cmpl-")
    chat, text = request({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, "chat"), \
        request({"prompt": "hi", "max_tokens": 2})
    rows = [{"text": "yo", "finish_reason": "stop", "ids": [1, 2]}]
    assert response(chat, "id", "m", rows, usage(2, 2))["object"] == "chat.completion"
    assert chunk(chat, "id", "m", 0, "yo", None)["object"] == "chat.completion.chunk"
    assert chunk(text, "id", "m", 0, "yo", None)["object"] == "text_completion"
    assert "token_ids" not in response(text, "id", "m", rows, usage(2, 2))["choices"][0]
    text.return_token_ids = True
    assert response(text, "id", "m", rows, usage(2, 2))["choices"][0]["token_ids"] == [1, 2]


# -- the engine, with a scripted generate.stream
DEFAULT = list(b"abcdefghijklmnopqrstuvwxyz" * 3)
OUTPUTS = {"end": [*b"ab", EOD], "stopid": list(b"abcdef")}


def fake_stream(calls, chunks, prompts, max_new_tokens, sampling, *, ps, eod_id, num_samples, media):
    """Like generate.stream: tokens [B] and done [B] per step, a row done at eod_id, the loop over when every
    row is done or after max_new_tokens. Row outputs come from OUTPUTS by prompt text; "fail" raises."""
    rows = [OUTPUTS.get(ByteTok().decode(p), DEFAULT) for p in prompts for _ in range(num_samples)]
    call = {"prompts": prompts, "max_tokens": max_new_tokens, "n": num_samples, "eod_id": eod_id, "steps": 0}
    calls.append(call)
    if any(ByteTok().decode(p) == "fail" for p in prompts):
        raise RuntimeError("boom\nsecond line")
    done = [False] * len(rows)
    for k in range(min(max_new_tokens, CONTEXT - max(map(len, prompts)))):
        tokens = [EOD if d else row[k] for d, row in zip(done, rows)]
        done = [d or t == eod_id for d, t in zip(done, tokens)]
        call["steps"] += 1
        yield torch.tensor(tokens), torch.tensor(done)
        if all(done):
            return


@pytest.fixture
def engine(monkeypatch):
    calls = []
    monkeypatch.setattr(serving, "stream", lambda *a, **kw: fake_stream(calls, *a, **kw))
    e = serving.Engine([SimpleNamespace(cfg=CFG)], ParallelState.single(), ByteTok(), EOD, max_batch=4, max_queue=8)
    e.calls = calls
    return e


def run_queued(engine, jobs) -> list[list[int]]:
    """Run what is queued, batch by batch, in this thread: the batches as indices into jobs."""
    engine.jobs.put(None)
    batches = []
    while (batch := engine.next_batch()) is not None:
        engine.run_guarded(batch)
        batches.append([jobs.index(j) for j in batch])
    return batches


def events(job) -> list[tuple]:
    out = []
    while not job.events.empty():
        out.append(job.events.get_nowait())
    return out


def submit(engine, *bodies):
    return [engine.submit(request(b), None) for b in bodies]


def test_batching_rules(engine):
    greedy = dict(prompt="ab", max_tokens=2, temperature=0)
    # a sampled head runs alone even with greedy jobs behind it
    jobs = submit(engine, dict(greedy, temperature=0.5), greedy, greedy)
    assert run_queued(engine, jobs) == [[0], [1, 2]]
    # at most max_batch (4) rows: 2 + 2 fit, a third job waits
    jobs = submit(engine, dict(greedy, n=2), dict(greedy, n=2), greedy)
    assert run_queued(engine, jobs) == [[0, 1], [2]]
    assert (len(engine.calls[-2]["prompts"]), engine.calls[-2]["n"]) == (4, 1)   # a batch: one row per choice
    # the longest prompt plus the largest max_tokens must fit the context: 4 + 60 does, 5 + 60 does not
    jobs = submit(engine, dict(greedy, prompt=[1] * 4, max_tokens=CONTEXT - 4), dict(greedy, prompt=[1] * 5),
                  dict(greedy, prompt=[1] * 4))
    assert run_queued(engine, jobs) == [[0, 2], [1]]
    # ignore_eos must agree
    jobs = submit(engine, greedy, dict(greedy, ignore_eos=True))
    assert run_queued(engine, jobs) == [[0], [1]]


def test_cancelled_jobs_never_run(engine):
    greedy = dict(prompt="ab", max_tokens=2, temperature=0)
    jobs = submit(engine, greedy, greedy, greedy)
    jobs[0].cancelled = jobs[2].cancelled = True                    # a cancelled head and a cancelled member
    assert run_queued(engine, jobs) == [[1]]
    assert engine.stats["cancelled"] == 2 and engine.stats["served"] == 1 and len(engine.calls) == 1
    assert events(jobs[0]) == [] and events(jobs[2]) == []


def test_finish_reasons_text_and_stream_events(engine):
    """stop string, stop id, end token, max_tokens: each row's reason and text, streamed pieces adding up to
    it, and a last delta carrying the reason (even with no new text)."""
    bodies = [dict(prompt="xy", max_tokens=10, temperature=0, stop=["cd"]),            # "ab" then held "c"
              dict(prompt="xy", max_tokens=10, temperature=0, stop=["c", "bc"]),       # the earliest cut wins
              dict(prompt="end", max_tokens=10, temperature=0),                        # "ab" + end token
              dict(prompt="xy", max_tokens=3, temperature=0)]                          # max_tokens
    jobs = submit(engine, *bodies)
    stopid = GenRequest("completion", [list(b"stopid")], 10, Sampling(), stop_ids=[ord("c")])
    jobs.append(engine.submit(stopid, None))                                            # a chat template's <|end|>
    run_queued(engine, jobs)
    want = [("ab", "stop", 4), ("a", "stop", 3), ("ab", "stop", 3), ("abc", "length", 3), ("ab", "stop", 3)]
    for job, (text, reason, n_ids) in zip(jobs, want):
        evs = events(job)
        (kind, rows, use), deltas = evs[-1], evs[:-1]
        assert kind == "done" and rows[0]["text"] == text and rows[0]["finish_reason"] == reason, (rows, text)
        assert len(rows[0]["ids"]) == n_ids and use["completion_tokens"] == n_ids
        assert "".join(d[2] for d in deltas) == text
        assert [d[3] for d in deltas] == [None] * (len(deltas) - 1) + [reason]


def test_ignore_eos_generates_past_the_end_token(engine):
    job, = submit(engine, dict(prompt="end", max_tokens=3, temperature=0, ignore_eos=True))
    run_queued(engine, [job])
    kind, rows, _ = events(job)[-1]
    assert engine.calls[0]["eod_id"] is None and rows[0]["finish_reason"] == "length"
    assert rows[0]["text"] == f"ab<{EOD}>"


def test_a_cancelled_job_leaves_the_step_loop(engine):
    """A client gone after its first token gets no more events, and its batch stops as soon as the rest of
    it is done (step 5 of 40)."""
    gone, rest = submit(engine, dict(prompt="xy", max_tokens=40, temperature=0), dict(prompt="xy", max_tokens=5,
                                                                                      temperature=0))
    emit = gone.emit

    def emit_then_leave(*event):
        emit(*event)
        gone.cancelled = True
    gone.emit = emit_then_leave
    assert run_queued(engine, [gone, rest]) == [[0, 1]]
    assert engine.calls[0]["steps"] == 5 and len(events(gone)) == 1 and events(rest)[-1][0] == "done"
    assert engine.stats["cancelled"] == 1 and engine.stats["served"] == 1


def raises(error):
    def f(*_):
        raise error
    return f


def test_queue_full_and_dead_engine_are_503(engine):
    jobs = submit(engine, *[dict(prompt="ab", temperature=0.5)] * 8)          # max_queue=8 wait
    refused = []

    def one_more():
        try:
            submit(engine, dict(prompt="ab"))
        except APIError as e:
            refused.append(e)
    t = threading.Thread(target=one_more, daemon=True)       # a full queue answers at once, never blocks
    t.start()
    t.join(5)
    assert refused and refused[0].status == 503 and refused[0].message.startswith("server busy")
    # an engine that stops tells the queued clients why, and refuses new ones
    engine.run_guarded = raises(RuntimeError("ranks out of step\nmore"))
    engine._loop()
    assert engine.dead == "engine stopped: RuntimeError: ranks out of step"
    assert all(events(j) == [("error", engine.dead)] for j in jobs[1:])
    with pytest.raises(APIError) as e:
        submit(engine, dict(prompt="ab"))
    assert e.value.status == 503 and e.value.message == engine.dead


def test_max_queue_counts_the_jobs_the_engine_drew_but_has_not_run(engine):
    """The engine thread draws the whole queue into its backlog; those jobs still wait, so they count
    against max_queue (8 here) and in /health's "queued"."""
    jobs = submit(engine, *[dict(prompt="ab", temperature=0.5)] * 8)
    assert engine.next_batch() == [jobs[0]] and len(engine.backlog) == 7 and engine.jobs.empty()
    submit(engine, dict(prompt="ab"))
    with pytest.raises(APIError, match="server busy: 8 requests already queued"):
        submit(engine, dict(prompt="ab"))
    TestClient = pytest.importorskip("fastapi.testclient").TestClient
    assert TestClient(serving.make_app(engine, "m")).get("/health").json()["queued"] == 8


def test_a_failure_with_several_ranks_stops_the_engine(engine):
    """One process goes on after a failed batch; ranks that may be out of step must not."""
    job, = submit(engine, dict(prompt="fail", temperature=0))
    engine.run_guarded(engine.next_batch())
    assert events(job) == [("error", "generation failed: RuntimeError: boom")] and engine.stats["failed"] == 1
    engine.ps = SimpleNamespace(world=SimpleNamespace(size=2))
    engine.run_batch = raises(RuntimeError("collective failed"))
    job, = submit(engine, dict(prompt="ab", temperature=0))
    with pytest.raises(RuntimeError, match="collective failed"):
        engine.run_guarded(engine.next_batch())
    assert events(job) == [("error", "generation failed: RuntimeError: collective failed")]


class World:
    """A two-rank world in one process: this rank's broadcasts, and what rank 0 "sends" a follower."""

    def __init__(self, rank, flags=()):
        self.size, self.rank, self.flags, self.sent = 2, rank, list(flags), []

    def broadcast(self, t, src):
        if self.rank == 0:
            self.sent.append(t.tolist())
            return t
        return torch.tensor([self.flags.pop(0)])


def test_every_rank_leaves_a_generation_at_the_step_rank_0_decides(engine):
    """Rank 0 broadcasts after each token whether to go on; a follower stops when told, however many
    tokens its own stream could still give (collectives of two commands must never interleave)."""
    cmd = {"prompts": [[1, 2]], "max_tokens": 10, "sampling": Sampling().__dict__, "n": 1, "ignore_eos": True}
    engine.ps = SimpleNamespace(world=World(rank=1, flags=[True, True, False]), device="cpu")
    engine.execute(cmd)
    assert engine.calls[-1]["steps"] == 3
    engine.ps = SimpleNamespace(world=World(rank=0), device="cpu")
    engine.execute(cmd, lambda tokens, done: len(engine.ps.world.sent) < 1)
    assert engine.ps.world.sent == [[True], [False]] and engine.calls[-1]["steps"] == 2


def test_idle_heartbeats_and_followers(engine):
    """Rank 0 sends idle commands while nothing is queued; a follower runs generate commands, ignores idle
    ones and leaves on stop."""
    sent = []
    engine._command = lambda cmd: sent.append(cmd) or cmd
    engine.heartbeat_s = 0.01
    threading.Timer(0.2, engine.jobs.put, [None]).start()
    assert engine.next_batch() is None and len(sent) >= 3 and all(c == {"op": "idle"} for c in sent)
    todo = iter([{"op": "idle"}, {"op": "generate", "x": 1}, {"op": "idle"}, {"op": "generate", "x": 2},
                 {"op": "stop"}])
    ran = []
    engine._command = lambda cmd: next(todo)
    engine.execute = ran.append
    engine.follow()
    assert [c["x"] for c in ran] == [1, 2] and next(todo, None) is None


# -- the app, on the scripted engine's thread
@pytest.fixture
def app(engine):
    pytest.importorskip("httpx")
    TestClient = pytest.importorskip("fastapi.testclient").TestClient
    engine.start()
    with TestClient(serving.make_app(engine, "m", max_n=4)) as client:
        yield client
    engine.stop()


def sse(text: str) -> list:
    """The frames of an SSE body, each "data: ...\n\n"; [DONE] last."""
    assert text.endswith("\n\n")
    frames = text[:-2].split("\n\n")
    assert all(f.startswith("data: ") and "\n" not in f for f in frames), frames
    assert frames[-1] == "data: [DONE]"
    return [json.loads(f[6:]) for f in frames[:-1]]


def test_app_streams_sse_and_reports_failures(app):
    ok = sse(app.post("/v1/completions", json={"model": "m", "prompt": "xy", "max_tokens": 3, "temperature": 0,
                                               "stream": True}).text)
    assert "".join(c["choices"][0]["text"] for c in ok) == "abc" and ok[-1]["choices"][0]["finish_reason"] == "length"
    chat = sse(app.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 2, "n": 2, "stream": True}).text)
    assert [(c["choices"][0]["index"], c["choices"][0]["delta"]) for c in chat[:2]] == \
        [(0, {"role": "assistant", "content": ""}), (1, {"role": "assistant", "content": ""})]
    failed = sse(app.post("/v1/completions", json={"model": "m", "prompt": "fail", "temperature": 0,
                                                   "stream": True}).text)
    assert failed == [{"error": {"message": "generation failed: RuntimeError: boom", "type": "server_error",
                                 "param": None, "code": None}}]
    r = app.post("/v1/completions", json={"model": "m", "prompt": "fail", "temperature": 0})
    assert r.status_code == 500 and r.json()["error"]["message"] == "generation failed: RuntimeError: boom"


def test_app_models_health_and_media(app, engine):
    model, = app.get("/v1/models").json()["data"]
    assert model["id"] == "m" and model["max_model_len"] == CONTEXT
    engine.chunks[0].cfg = SimpleNamespace(**{**vars(CFG), "image_token_id": 5})    # a model with an image adapter
    r = app.post("/v1/completions", json={"model": "m", "prompt": "<image>", "media": {"video": []}})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith('media: expected {"images"')
    engine.dead = "engine stopped: RuntimeError: x"
    r = app.get("/health")
    assert r.status_code == 503 and r.json()["status"] == engine.dead


def test_a_client_gone_before_its_reply_cancels_the_job(engine):
    """The non-streaming handler waits for the engine; cancelled (the client went away), it marks the job
    cancelled, so the engine skips it."""
    pytest.importorskip("fastapi")
    app = serving.make_app(engine, "m")
    endpoint = next(r.endpoint for r in app.routes if getattr(r, "path", "") == "/v1/completions")

    class Request:
        async def json(self):
            return {"model": "m", "prompt": "ab"}

    async def call_and_leave():
        task = asyncio.create_task(endpoint(Request()))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(call_and_leave())
    assert engine.jobs.get_nowait().cancelled
