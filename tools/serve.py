#!/usr/bin/env python
"""Serve a megagpt checkpoint (any saved layout, resharded on load) or an HF Llama directory over an
OpenAI-compatible HTTP API: POST /v1/completions, POST /v1/chat/completions (SSE with "stream": true),
GET /v1/models, GET /health.

    python tools/serve.py --load runs/tiny --port 8000
    torchrun --nproc-per-node 4 tools/serve.py --load runs/tiny --tp 2 --pp 2 --port 8000

Rank 0 runs FastAPI with uvicorn; the other ranks follow it in lockstep (megagpt/serving.py). --port 0
picks a free port. The first line on stdout names the address once the model is loaded. Exit codes:
0 after a clean stop (Ctrl-C / SIGTERM to rank 0), 2 bad input or arguments (one line on stderr).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import socket
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from megagpt.loading import INPUT_ERRORS  # noqa: E402

ERRORS = INPUT_ERRORS + (ImportError,)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, metavar="DIR", help="megagpt run/step directory or HF directory")
    p.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: a free port (printed on the first line)")
    p.add_argument("--model-name", help="the model id clients send (default: the --load directory's name)")
    p.add_argument("--max-n", type=int, default=16, help="most rows (prompts x n) in one request")
    p.add_argument("--max-batch", type=int, default=16, help="most rows in one batch of greedy requests")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond this get 503")
    p.add_argument("--heartbeat", type=float, default=5.0, help="seconds between idle commands to followers")
    return p.parse_args(argv)


def check_args(args) -> None:
    for name in ("max_n", "max_batch", "max_queue"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port: expected 0..65535, got {args.port}")
    if not args.heartbeat > 0:
        raise ValueError(f"--heartbeat: expected a positive number of seconds, got {args.heartbeat}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and world != args.tp * args.pp:
        raise ValueError(f"--tp/--pp: the server runs one replica, so the world size {world} must equal "
                         f"tp*pp={args.tp}*{args.pp}; start one server per replica")
    for module in ("fastapi", "uvicorn"):                 # one line now rather than a traceback after loading
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"no module named {module!r}")


def _quiet_exit(server_class):
    """uvicorn's Server, except that SIGINT/SIGTERM end `run` normally instead of being raised again after
    the shutdown: the followers must still be told to stop."""
    class Server(server_class):
        @contextlib.contextmanager
        def capture_signals(self):
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in old.items():
                    signal.signal(s, handler)
    return Server


def run(args) -> int:
    from megagpt.loading import load_for_generation
    from megagpt.serving import Engine, make_app
    check_args(args)
    chunks, ps, tok, eod = load_for_generation(args.load, args.tp, args.pp, args.tokenizer)
    if tok is None:
        raise ValueError("--tokenizer: the checkpoint has no tokenizer; the server needs one (pass --tokenizer FILE)")
    engine = Engine(chunks, ps, tok, eod, heartbeat_s=args.heartbeat, max_queue=args.max_queue,
                    max_batch=args.max_batch)
    if ps.rank != 0:
        # a follower leaves when rank 0 says stop (it does on its own SIGINT/SIGTERM, which torchrun and a
        # terminal's Ctrl-C also send here); quitting first would break rank 0's last broadcast
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        engine.follow()
        return 0
    import uvicorn
    name = args.model_name or os.path.basename(os.path.normpath(args.load))
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    port = sock.getsockname()[1]
    server = _quiet_exit(uvicorn.Server)(uvicorn.Config(make_app(engine, name, args.max_n), log_level="warning"))
    print(f"serve: model {name!r} on http://{args.host}:{port}/v1 (tp={args.tp} pp={args.pp}, "
          f"context {engine.context} tokens)", flush=True)
    engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()                 # the followers leave their loop too
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    try:
        code = run(args)
    except ERRORS as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, ImportError):
            msg = f"{msg}: the server needs fastapi and uvicorn (pip install -e '.[serve]')"
        print(f"serve: {msg}", file=sys.stderr)
        return 2
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
