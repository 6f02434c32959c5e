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
        self.finish: str | None = None

    def text(self) -> str:
        ids = self.ids[:-1] if self.ids and self.ids[-1] in self.end_ids else self.ids
        t = self.decode(ids)
        cuts = [t.find(s) for s in self.stop if s in t]
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
    """A request on rank 0: its checked fields, and the events the engine thread sends to its handler."""

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop):
        self.req, self.loop = req, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    def emit(self, *event):
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    """Runs generation commands on every rank of one replica; rank 0 also owns the queue of jobs."""

    def __init__(self, chunks, ps, tok, eod_id: int | None, heartbeat_s: float = 5.0, max_queue: int = 64):
        self.chunks, self.ps, self.tok, self.eod_id = chunks, ps, tok, eod_id
        self.context, self.vocab = chunks[0].cfg.max_seq_len, chunks[0].cfg.vocab_size
        self.heartbeat_s = heartbeat_s
        self.jobs: queue.Queue = queue.Queue(max_queue)
        self.stats = {"served": 0, "cancelled": 0, "failed": 0, "tokens": 0, "busy_s": 0.0}
        self.thread: threading.Thread | None = None

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

    def execute(self, cmd: dict, on_step=None, cancelled=None) -> None:
        """Run one generation command (every rank, same cmd). on_step(tokens [B], done [B]) on rank 0."""
        stop_ids, stops, decode = set(cmd["stop_ids"]), cmd["stop"], self.tok.decode

        def stop(ids: list[int]) -> bool:
            return ids[-1] in stop_ids or (bool(stops) and any(s in decode(ids) for s in stops))
        steps = stream(self.chunks, cmd["prompts"], cmd["max_tokens"], Sampling(**cmd["sampling"]), ps=self.ps,
                       eod_id=None if cmd.get("ignore_eos") else self.eod_id, stop=stop, num_samples=cmd["n"])
        for tok, done in steps:
            if on_step is not None:
                on_step(tok.tolist(), done.tolist())
            if self._agree(cancelled is not None and cancelled()):
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
        job = Job(req, loop)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(503, f"server busy: {self.jobs.maxsize} requests already queued; retry later") from None
        return job

    def _loop(self) -> None:
        while True:
            try:
                job = self.jobs.get(timeout=self.heartbeat_s)
            except queue.Empty:
                self._command({"op": "idle"})
                continue
            if job is None:
                self._command({"op": "stop"})
                return
            if job.cancelled:
                self.stats["cancelled"] += 1
                continue
            t0 = time.perf_counter()
            try:
                self._run(job)
            except Exception as e:  # noqa: BLE001 -- reported to its client; the server goes on
                self.stats["failed"] += 1
                job.emit("error", f"generation failed: {type(e).__name__}: {e}".splitlines()[0])
            self.stats["busy_s"] += time.perf_counter() - t0

    def _run(self, job: Job) -> None:
        req = job.req
        cmd = self._command({"op": "generate", **req.command()})
        end_ids = set(req.stop_ids) | ({self.eod_id} if self.eod_id is not None and not req.ignore_eos else set())
        rows = [RowText(self.tok.decode, req.stop, end_ids) for _ in range(len(req.prompts) * req.n)]

        def on_step(tokens, done):
            for r, row in enumerate(rows):
                if row.finish is None:
                    text = row.push(tokens[r])
                    if done[r]:
                        text += row.close("stop")
                    if text or row.finish:
                        job.emit("delta", r, text, row.finish)
        self.execute(cmd, on_step, lambda: job.cancelled)
        if job.cancelled:
            self.stats["cancelled"] += 1
            return
        for r, row in enumerate(rows):
            if row.finish is None:
                job.emit("delta", r, row.close("length"), "length")
        generated = sum(len(row.ids) for row in rows)
        self.stats["served"] += 1
        self.stats["tokens"] += generated
        results = [{"text": row.text(), "finish_reason": row.finish, "ids": row.ids} for row in rows]
        job.emit("done", results, usage(sum(len(p) for p in req.prompts), generated))


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
        return {"status": "ok", "model": model, "queued": engine.jobs.qsize(), **engine.stats}

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
