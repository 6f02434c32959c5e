"""The OpenAI-compatible server: one engine that runs requests one at a time in lockstep on every rank of
a model replica (tp x pp), and the FastAPI app on rank 0 that feeds it (tools/serve.py starts both).

Lockstep. Collectives of two requests must never interleave (Megatron-LM #720), so only one thread on
one rank decides what runs next: rank 0's engine thread takes a request from its queue and broadcasts it
as a command (JSON bytes over the world group); every other rank waits in `follow` for that command and
runs the same `generate.stream` call. After each token rank 0 also broadcasts whether to go on (its
client may have gone away), so all ranks leave a cancelled request at the same step. While idle, rank 0
sends a heartbeat command every `heartbeat_s`, so a follower's wait never reaches the gloo timeout.

Text. Each choice's text is the decoded ids (its end token dropped) cut before the first stop string.
Streaming sends the part of that text that can no longer change: a trailing partial UTF-8 character and
any tail that could be the start of a stop string are held back, so the streamed pieces always add up to
the non-streaming text.
"""

import asyncio
import collections
import json
import queue
import threading
import time

import torch

from .generate import stream
from .openai_api import APIError, GenRequest, chunk, new_id, parse_request, response, usage, usage_chunk
from .sampling import Sampling


class RowText:
    """The text of one choice as its tokens arrive."""

    def __init__(self, decode, stop: list[str], end_ids: set[int]):
        self.decode, self.stop, self.end_ids = decode, stop, end_ids
        self.ids: list[int] = []
        self.sent = 0                     # characters already streamed
        self.hit = False                  # a stop string has appeared
        self.finish: str | None = None

    def text(self) -> str:
        ids = self.ids[:-1] if self.ids and self.ids[-1] in self.end_ids else self.ids
        t = self.decode(ids)
        cuts = [t.find(s) for s in self.stop if s in t]
        self.hit = bool(cuts)
        return t[:min(cuts)] if cuts else t

    def push(self, token: int) -> str:
        """Add a token; returns the new text that is safe to stream."""
        self.ids.append(token)
        t = self.text()
        keep = len(t.rstrip("\ufffd"))                            # a partial character: wait for its bytes
        for s in self.stop:                                      # a tail that may grow into a stop string
            k = next((k for k in range(min(len(s) - 1, len(t)), 0, -1) if t.endswith(s[:k])), 0)
            keep = min(keep, len(t) - k)
        return self._emit(t[:keep])

    def close(self, reason: str) -> str:
        """The row is finished: the rest of its text."""
        self.finish = reason
        return self._emit(self.text())

    def _emit(self, t: str) -> str:
        delta = t[self.sent:]
        self.sent = max(self.sent, len(t))
        return delta


class Job:
    """A request on rank 0: its checked fields, its choices' text, and the events the engine thread sends
    to its handler ("delta", index, text, finish_reason), then ("done", results, usage) or ("error", line)."""

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop | None):
        self.req, self.loop = req, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False            # set by the handler when its client has gone
        self.over = False                 # the engine is done with it
        self.rows: list[RowText] = []

    @property
    def width(self) -> int:               # rows it adds to a batch
        return len(self.req.prompts) * self.req.n

    def emit(self, *event):
        if self.loop is None:
            self.events.put_nowait(event)
        else:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    """Runs generation commands on every rank of one replica; rank 0 also owns the queue of jobs.

    Greedy requests waiting together run as one batch (their prompts left-padded into one `stream`
    call; rows are independent, so each gets the tokens it would get alone) as long as they share the
    repetition penalty and ignore_eos, fit in `max_batch` rows, and their longest prompt plus their
    largest max_tokens fits the context. A sampled request runs alone: its seeded draws must not depend
    on what else is queued. Stop strings, stop ids and each request's max_tokens are applied on rank 0,
    which ends the step loop, on every rank at once, when no row of the batch still needs a token."""

    def __init__(self, chunks, ps, tok, eod_id: int | None, heartbeat_s: float = 5.0, max_queue: int = 64,
                 max_batch: int = 16):
        self.chunks, self.ps, self.tok, self.eod_id = chunks, ps, tok, eod_id
        self.context, self.vocab = chunks[0].cfg.max_seq_len, chunks[0].cfg.vocab_size
        self.heartbeat_s, self.max_batch = heartbeat_s, max_batch
        self.jobs: queue.Queue = queue.Queue(max_queue)
        self.backlog: collections.deque = collections.deque()          # taken from the queue, not yet run
        self.stats = {"served": 0, "cancelled": 0, "failed": 0, "batches": 0, "tokens": 0, "busy_s": 0.0}
        self.thread: threading.Thread | None = None
        self.dead: str | None = None                                    # why the engine thread stopped

    # -- lockstep: rank 0 decides, every rank does the same
    def _command(self, cmd: dict | None) -> dict:
        """Rank 0's command (cmd) -> the same dict on every rank."""
        world = self.ps.world
        if world.size == 1:
            return cmd
        dev = self.ps.device
        data = json.dumps(cmd).encode() if world.rank == 0 else b""
        n = world.broadcast(torch.tensor([len(data)], dtype=torch.long, device=dev), 0)
        buf = torch.tensor(list(data), dtype=torch.uint8, device=dev) if world.rank == 0 else \
            torch.empty(int(n), dtype=torch.uint8, device=dev)
        return json.loads(bytes(world.broadcast(buf, 0).cpu().tolist()))

    def _agree(self, flag: bool) -> bool:
        """Rank 0's flag on every rank."""
        if self.ps.world.size == 1:
            return flag
        return bool(self.ps.world.broadcast(torch.tensor([flag], device=self.ps.device), 0))

    def execute(self, cmd: dict, on_step=None) -> None:
        """Run one generation command (every rank, same cmd). On rank 0, on_step(tokens [B], done [B]) says
        whether to go on; its answer ends the loop on every rank at the same step."""
        from .multimodal.prompt import media_from_json
        steps = stream(self.chunks, cmd["prompts"], cmd["max_tokens"], Sampling(**cmd["sampling"]), ps=self.ps,
                       eod_id=None if cmd["ignore_eos"] else self.eod_id, num_samples=cmd["n"],
                       media=media_from_json(cmd.get("media")))
        for tok, done in steps:
            go_on = on_step(tok.tolist(), done.tolist()) if on_step is not None else True
            if not self._agree(go_on):
                steps.close()
                return

    def follow(self) -> None:
        """Ranks other than 0: run what rank 0 broadcasts until it says stop."""
        while True:
            cmd = self._command(None)
            if cmd["op"] == "stop":
                return
            if cmd["op"] == "generate":
                self.execute(cmd)

    # -- rank 0
    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="megagpt-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join()

    def submit(self, req: GenRequest, loop) -> Job:
        if self.dead:
            raise APIError(503, self.dead)
        job = Job(req, loop)
        try:
            if self.waiting() >= self.jobs.maxsize:     # the backlog too: max_queue bounds all that waits
                raise queue.Full
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(503, f"server busy: {self.jobs.maxsize} requests already queued; retry later") from None
        return job

    def waiting(self) -> int:
        """Jobs submitted and not yet taken into a batch: the queue and the engine thread's backlog."""
        return self.jobs.qsize() + len(self.backlog)

    def _loop(self) -> None:
        try:
            while True:
                batch = self.next_batch()
                if batch is None:
                    self._command({"op": "stop"})
                    return
                t0 = time.perf_counter()
                self.run_guarded(batch)
                self.stats["busy_s"] += time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 -- the ranks may be out of step: refuse what comes next
            self.dead = f"engine stopped: {type(e).__name__}: {e}".splitlines()[0]
            while self.backlog or not self.jobs.empty():
                job = self.backlog.popleft() if self.backlog else self.jobs.get_nowait()
                if job is not None:
                    job.emit("error", self.dead)

    def run_guarded(self, batch: list[Job]) -> None:
        """run_batch; an error goes to the batch's clients. One process goes on; ranks that may have left
        a collective half done do not (the error is raised again)."""
        try:
            self.run_batch(batch)
        except Exception as e:
            self.stats["failed"] += len(batch)
            for job in batch:
                job.emit("error", f"generation failed: {type(e).__name__}: {e}".splitlines()[0])
            if self.ps.world.size > 1:
                raise

    def next_batch(self) -> list[Job] | None:
        """The next jobs to run together (waiting for one, with heartbeats while idle); None: stop."""
        while True:
            while len(self.backlog) < self.jobs.maxsize:
                try:
                    self.backlog.append(self.jobs.get(timeout=self.heartbeat_s) if not self.backlog else
                                        self.jobs.get_nowait())
                except queue.Empty:
                    break
            if not self.backlog:
                self._command({"op": "idle"})
                continue
            head = self.backlog.popleft()
            if head is None:
                return None
            if not head.cancelled:
                break
            self.stats["cancelled"] += 1
        batch, req = [head], head.req
        if req.sampling.do_sample or req.media is not None:       # a request with media runs alone
            return batch
        key = (req.sampling.repetition_penalty, req.ignore_eos)
        rows, longest, most = head.width, max(map(len, req.prompts)), req.max_tokens
        for job in list(self.backlog):
            if job is None:
                break
            r = job.req
            if r.sampling.do_sample or r.media is not None or (r.sampling.repetition_penalty, r.ignore_eos) != key \
                    or job.cancelled:
                continue
            wide, long_, many = rows + job.width, max(longest, *map(len, r.prompts)), max(most, r.max_tokens)
            if wide <= self.max_batch and long_ + many <= self.context:
                batch.append(job)
                self.backlog.remove(job)
                rows, longest, most = wide, long_, many
        return batch

    def run_batch(self, jobs: list[Job]) -> None:
        """Run jobs as one command; each job's events go out as its rows finish."""
        alone, first = len(jobs) == 1, jobs[0].req
        prompts, owner = [], []                                  # one row per choice: (job, choice index)
        for job in jobs:
            req = job.req
            ends = set(req.stop_ids) | ({self.eod_id} if self.eod_id is not None and not req.ignore_eos else set())
            job.rows = [RowText(self.tok.decode, req.stop, ends) for _ in range(job.width)]
            owner += [(job, i) for i in range(job.width)]
            prompts += req.prompts if alone else [p for p in req.prompts for _ in range(req.n)]
        cmd = self._command({"op": "generate", "prompts": prompts, "max_tokens": max(j.req.max_tokens for j in jobs),
                             "sampling": first.sampling.__dict__, "n": first.n if alone else 1,
                             "ignore_eos": first.ignore_eos, "media": first.media})
        self.stats["batches"] += 1

        def on_step(tokens, done) -> bool:
            for r, (job, i) in enumerate(owner):
                row = job.rows[i]
                if job.over or row.finish is not None:
                    continue
                text = row.push(tokens[r])
                reason = "stop" if done[r] or tokens[r] in job.req.stop_ids or row.hit else \
                    "length" if len(row.ids) >= job.req.max_tokens else None
                if reason:
                    text += row.close(reason)
                if text or reason:
                    job.emit("delta", i, text, reason)
            for job in jobs:
                if not job.over and (job.cancelled or all(row.finish for row in job.rows)):
                    self._finish(job)
            return not all(job.over for job in jobs)
        self.execute(cmd, on_step)
        for job in jobs:                     # (every row has finished by now: max_tokens fit the steps)
            if not job.over:
                self._finish(job)

    def _finish(self, job: Job) -> None:
        job.over = True
        if job.cancelled:
            self.stats["cancelled"] += 1
            return
        generated = sum(len(row.ids) for row in job.rows)
        self.stats["served"] += 1
        self.stats["tokens"] += generated
        results = [{"text": row.text(), "finish_reason": row.finish or "length", "ids": row.ids} for row in job.rows]
        job.emit("done", results, usage(sum(len(p) for p in job.req.prompts), generated))


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def make_app(engine: Engine, model: str, max_n: int = 16):
    """The FastAPI app (rank 0): /v1/completions, /v1/chat/completions, /v1/models, /health."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    app = FastAPI(title="megagpt")
    created = int(time.time())

    @app.get("/health")
    async def health():
        body = {"status": engine.dead or "ok", "model": model, "queued": engine.waiting(), **engine.stats}
        return JSONResponse(body, status_code=503 if engine.dead else 200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                            "owned_by": "megagpt", "max_model_len": engine.context}]}

    async def handle(kind: str, request: Request):
        try:
            try:
                body = await request.json()
            except ValueError:
                raise APIError(400, "body: expected a JSON object (the request body is not valid JSON)") from None
            req = parse_request(kind, body, engine.tok, model=model, context=engine.context, vocab=engine.vocab,
                                model_cfg=engine.chunks[0].cfg,
                                max_n=max_n)
            job = engine.submit(req, asyncio.get_running_loop())
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        rid = new_id(kind)
        if req.stream:
            return StreamingResponse(_stream(job, rid), media_type="text/event-stream")
        try:
            kind_, *rest = await job.events.get()
            while kind_ == "delta":
                kind_, *rest = await job.events.get()
            if kind_ == "error":
                return JSONResponse(APIError(500, rest[0]).body(), status_code=500)
            return JSONResponse(response(req, rid, model, *rest))
        finally:
            job.cancelled = True

    async def _stream(job: Job, rid: str):
        req = job.req
        try:
            if req.kind == "chat":
                for i in range(len(req.prompts) * req.n):
                    yield _sse(chunk(req, rid, model, i, "", None, first=True))
            while True:
                kind_, *rest = await job.events.get()
                if kind_ == "delta":
                    yield _sse(chunk(req, rid, model, *rest))
                elif kind_ == "done":
                    if req.include_usage:
                        yield _sse(usage_chunk(req, rid, model, rest[1]))
                    break
                else:
                    yield _sse(APIError(500, rest[0]).body())
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True          # a client gone mid-stream: the engine leaves the job at its next token

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle("completion", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle("chat", request)

    return app
