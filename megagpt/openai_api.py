"""The OpenAI wire format for the server (megagpt/serving.py): request bodies checked field by field into
a `GenRequest`, and the response and stream-chunk objects built back.

Every bad request is an `APIError`: an HTTP status and one line naming the field and what was expected
(missing fields, wrong types, top_p outside (0, 1], a negative temperature, n over the server's limit,
an unknown model). A prompt whose tokens plus max_tokens exceed the model's context is refused, never
truncated. Extensions beyond OpenAI's fields: `top_k`, `repetition_penalty`, `return_token_ids` (each
choice's generated ids), `ignore_eos` (go on past the end-of-document token), `media` (a multimodal model's
images and audio for a completion's one string prompt with <image>/<audio> placeholders: {"images": [...],
"audio": [...]}, each a file path on the server or {"base64": the PNG/WAV bytes}; multimodal/prompt.py).
Fields this server does not implement (logprobs, echo, suffix, best_of > 1, tools, ...) are refused
rather than ignored; harmless ones (user, presence/frequency_penalty of 0) are accepted.
"""
from __future__ import annotations

import math
import secrets
import time
import uuid
from dataclasses import dataclass, field

from .sampling import Sampling

ROLES = ("system", "user", "assistant")
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
               "best_of": (None, 1), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
               "tool_choice": (None, "none"), "response_format": (None, {"type": "text"}),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0)}


class APIError(Exception):
    """A request the server refuses: status (4xx) and a one-line message naming the field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message.splitlines()[0], param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class GenRequest:
    """One request, checked: what the engine runs (prompts x n rows) and how the reply is shaped."""
    kind: str                                 # "completion" or "chat"
    prompts: list[list[int]]
    max_tokens: int
    sampling: Sampling
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False               # stream_options.include_usage: a last chunk with the usage
    return_token_ids: bool = False
    ignore_eos: bool = False                  # go on past the end-of-document token (benchmarks, tests)
    media: dict | None = None                 # the prompt's images and audio as JSON (multimodal/prompt.py)

    def command(self) -> dict:
        """The JSON-able part every rank needs to run it in lockstep."""
        return {"prompts": self.prompts, "max_tokens": self.max_tokens, "sampling": self.sampling.__dict__,
                "n": self.n, "stop": self.stop, "stop_ids": self.stop_ids, "ignore_eos": self.ignore_eos,
                "media": self.media}


def chat_template(tok, messages: list[dict]) -> tuple[list[int], list[str], list[int]]:
    """The one chat template of the server: messages -> (prompt ids, stop strings, stop token ids).

    A tokenizer that carries the chat tokens (an SFT model's: align/chat.py) gets that template,
    `apply_chat_template(..., add_generation_prompt=True)`, stopping at <|end|>. Any other gets a plain
    fallback: "System: ...\nUser: ...\nAssistant: ...\nAssistant:", stopping where the model starts the
    next user turn."""
    from .align.chat import CHAT_TOKENS, END_TOKEN, apply_chat_template
    if hasattr(tok, "token_id") and all(tok.token_id(t) is not None for t in CHAT_TOKENS):
        ids, _ = apply_chat_template(tok, messages, add_generation_prompt=True, require_assistant=False)
        return ids, [], [tok.token_id(END_TOKEN)]
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    return tok.encode(text), ["\nUser:", "\nSystem:"], []


# -- field checks: each raises APIError(400, "<field>: expected ..., got ...")
def _bad(name: str, expected: str, value) -> APIError:
    shown = repr(value[:60]) if isinstance(value, str) else str(value)[:60]
    return APIError(400, f"{name}: expected {expected}, got {shown}", param=name)


def _number(body: dict, name: str, default, ok, expected: str):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
        raise _bad(name, expected, v)
    return v


def _int(body: dict, name: str, default, ok, expected: str):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not ok(v):
        raise _bad(name, expected, v)
    return v


def _token_list(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)


def _prompts(body: dict, tok) -> list[list[int]]:
    """A completion prompt: a string, a list of strings, a list of token ids, or a list of such lists."""
    p = body.get("prompt")
    expected = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if p is None:
        raise APIError(400, "prompt: missing (" + expected + ")", param="prompt")
    if isinstance(p, str):
        texts = [p]
    elif _token_list(p):
        return [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        texts = p
    elif isinstance(p, list) and p and all(_token_list(x) for x in p):
        return p
    else:
        raise _bad("prompt", expected, p)
    return [tok.encode(t) for t in texts]


def _messages(body: dict) -> list[dict]:
    ms = body.get("messages")
    if ms is None:
        raise APIError(400, "messages: missing (a non-empty list of {role, content} objects)", param="messages")
    if not isinstance(ms, list) or not ms:
        raise _bad("messages", "a non-empty list of {role, content} objects", ms)
    out = []
    for k, m in enumerate(ms):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):              # [{"type": "text", "text": ...}, ...]: the text parts
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise _bad(f"messages[{k}].content", "a string or a list of text parts", content)
            content = "".join(c["text"] for c in content)
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(content, str):
            raise _bad(f"messages[{k}]", f"{{\"role\": one of {list(ROLES)}, \"content\": a string}}", m)
        out.append({"role": m["role"], "content": content})
    return out


def _stop(body: dict) -> list[str]:
    s = body.get("stop")
    if s is None:
        return []
    if isinstance(s, str):
        s = [s]
    if not isinstance(s, list) or len(s) > 4 or not all(isinstance(x, str) and x for x in s):
        raise _bad("stop", "a non-empty string or a list of up to 4 of them", s)
    return s


def _media(kind: str, body: dict, tok, model_cfg) -> tuple[list[int], dict]:
    """The `media` extension: (the prompt's ids with placeholder runs, the media as JSON); 400 on bad media."""
    from .multimodal.prompt import request_media
    if kind != "completion" or not isinstance(body.get("prompt"), str):
        raise APIError(400, "media: only with /v1/completions and one string prompt", param="media")
    if model_cfg is None or (model_cfg.image_token_id is None and model_cfg.audio_token_id is None):
        raise APIError(400, "media: this model has no image or audio adapter", param="media")
    try:
        return request_media(body["media"], tok, model_cfg, body["prompt"])
    except ValueError as e:                                      # MediaError, DataError: one line
        raise APIError(400, str(e) if str(e).startswith("media") else f"media: {e}", param="media") from None


def parse_request(kind: str, body, tok, *, model: str, context: int, vocab: int, max_n: int,
                  model_cfg=None) -> GenRequest:
    """Check a /v1/completions ("completion") or /v1/chat/completions ("chat") body -> GenRequest.
    model_cfg: the served ModelConfig (its adapters, for the `media` extension)."""
    if not isinstance(body, dict):
        raise APIError(400, "body: expected a JSON object")
    if "model" not in body:
        raise APIError(400, "model: missing (this server serves " + repr(model) + ")", param="model")
    if body["model"] != model:
        raise APIError(404, f"model: {str(body['model'])[:60]!r} is not served here (this server serves {model!r})",
                       param="model", code="model_not_found")
    for name, fine in UNSUPPORTED.items():
        if name in body and body[name] not in fine:
            raise APIError(400, f"{name}: not supported by this server (leave it out)", param=name)
    stop_ids: list[int] = []
    if kind == "chat":
        prompt, stop, stop_ids = chat_template(tok, _messages(body))
        prompts, stop = [prompt], stop + _stop(body)
        default_max = None                                       # chat: up to the context
    else:
        prompts, stop, default_max = _prompts(body, tok), _stop(body), 16
    media = None
    if body.get("media") is not None:
        prompt, media = _media(kind, body, tok, model_cfg)
        prompts = [prompt]
    for i, p in enumerate(prompts):
        if not p:
            raise APIError(400, f"prompt: prompt {i} is empty (at least one token is needed)", param="prompt")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary of {vocab}", param="prompt")
    longest = max(len(p) for p in prompts)
    # chat's max_completion_tokens (when not null) wins over max_tokens; completions have only max_tokens
    name = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _int(body, name, default_max, lambda v: v >= 1, "a positive integer")
    if max_tokens is None:                                       # chat without a limit: the rest of the context
        if longest >= context:
            raise APIError(400, f"messages: the prompt's {longest} tokens leave no room in the model's context of "
                           f"{context} tokens (nothing is truncated)", param="messages", code="context_length_exceeded")
        max_tokens = context - longest
    if longest + max_tokens > context:
        raise APIError(400, f"{name}: the prompt's {longest} tokens + {name}={max_tokens} exceed the model's "
                       f"context of {context} tokens (nothing is truncated)", param=name,
                       code="context_length_exceeded")
    temperature = _number(body, "temperature", 1.0, lambda v: v >= 0, "a number >= 0")
    top_p = _number(body, "top_p", 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = _int(body, "top_k", 0, lambda v: v >= 0, "a non-negative integer")
    penalty = _number(body, "repetition_penalty", 1.0, lambda v: v > 0, "a positive number")
    seed = _int(body, "seed", None, lambda v: True, "an integer")
    n = _int(body, "n", 1, lambda v: v >= 1, "a positive integer")
    if n * len(prompts) > max_n:
        raise APIError(400, f"n: {n} choices x {len(prompts)} prompts exceed the server's limit of {max_n} "
                       "(tools/serve.py --max-n)", param="n")
    for flag in ("stream", "return_token_ids", "ignore_eos"):
        if not isinstance(body.get(flag, False), bool):
            raise _bad(flag, "true or false", body[flag])
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise _bad("stream_options", '{"include_usage": true or false}', opts)
    sampling = Sampling(do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                        top_k=top_k, top_p=top_p, repetition_penalty=penalty,
                        seed=secrets.randbits(31) if seed is None else seed)
    return GenRequest(kind, prompts, max_tokens, sampling, n, stop, stop_ids, body.get("stream", False),
                      bool(opts.get("include_usage", False)), body.get("return_token_ids", False),
                      body.get("ignore_eos", False), media)


# -- responses
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _head(req: GenRequest, rid: str, model: str, chunk: bool) -> dict:
    obj = {"completion": "text_completion", "chat": "chat.completion.chunk" if chunk else "chat.completion"}
    return {"id": rid, "object": obj[req.kind], "created": int(time.time()), "model": model}


def response(req: GenRequest, rid: str, model: str, rows: list[dict], use: dict) -> dict:
    """rows: per choice {"text", "finish_reason", "ids"} -> the whole (non-streaming) response."""
    choices = []
    for i, r in enumerate(rows):
        c = {"index": i, "logprobs": None, "finish_reason": r["finish_reason"]}
        if req.kind == "chat":
            c["message"] = {"role": "assistant", "content": r["text"]}
        else:
            c["text"] = r["text"]
        if req.return_token_ids:
            c["token_ids"] = r["ids"]
        choices.append(c)
    return {**_head(req, rid, model, False), "choices": choices, "usage": use}


def chunk(req: GenRequest, rid: str, model: str, index: int, text: str | None, finish_reason: str | None,
          first: bool = False) -> dict:
    """One streamed piece of choice `index`: new text (may be empty) and, on its last chunk, the finish reason."""
    c = {"index": index, "logprobs": None, "finish_reason": finish_reason}
    if req.kind == "chat":
        c["delta"] = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
    else:
        c["text"] = text or ""
    return {**_head(req, rid, model, True), "choices": [c]}


def usage_chunk(req: GenRequest, rid: str, model: str, use: dict) -> dict:
    return {**_head(req, rid, model, True), "choices": [], "usage": use}
