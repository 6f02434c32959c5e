"""The chat template: the one function that turns a conversation into token ids and a loss mask.

    <|system|>You are terse.<|end|><|user|>2+2?<|end|><|assistant|>4<|end|>

Each turn is its role token, its content's tokens, then <|end|>. The role markers and <|end|> are
special tokens added to an existing tokenizer (`add_chat_tokens`: new ids after its vocab, so the
model's embedding grows to fit; align/grow.py). The loss mask is 1 on the assistant's content and
its <|end|> (the model must learn to stop) and 0 elsewhere. Text that happens to contain a marker
string ("<|user|>") is encoded as plain bytes, never as the marker: a user cannot forge a turn.
`apply_chat_template(..., add_generation_prompt=True)` ends with <|assistant|>, for generation
(tools/generate.py, the server).

CHAT_TEMPLATE is the same template as the Jinja string an HF export writes into tokenizer_config.json
(checkpoint/hf.py write_hf_tokenizer), so that transformers' apply_chat_template gives these ids token
for token. HF tokenizes the rendered text, where a marker string in a message would become the marker:
the Jinja template refuses such a message (raise_exception) instead of forging a turn.
"""
from __future__ import annotations

import re

import json

from ..data.indexed import DataError
from ..data.tokenizer import EOD_TOKEN, Tokenizer

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {r: f"<|{r}|>" for r in ROLES}
END_TOKEN = "<|end|>"
CHAT_TOKENS = (*ROLE_TOKENS.values(), END_TOKEN)

# the template above in Jinja (transformers' chat_template): errors as apply_chat_template's, one line
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in " + json.dumps(list(ROLES)) + " or message['content'] is not string -%}"
    "{{ raise_exception('message ' ~ loop.index0 ~ ' must be {role: system|user|assistant, content: a string}') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' and not loop.first -%}"
    "{{ raise_exception('message ' ~ loop.index0 ~ ' is a system turn; only the first message may be one') }}"
    "{%- endif -%}"
    "{%- for marker in " + json.dumps([*CHAT_TOKENS, EOD_TOKEN]) + " -%}{%- if marker in message['content'] -%}"
    "{{ raise_exception('message ' ~ loop.index0 ~ ' contains the marker ' ~ marker ~ ' (it would forge a turn)') }}"
    "{%- endif -%}{%- endfor -%}"
    "{{ '<|' ~ message['role'] ~ '|>' ~ message['content'] ~ '" + END_TOKEN + "' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + ROLE_TOKENS["assistant"] + "' }}{%- endif -%}"
)


class TemplateError(DataError):
    """A conversation the template cannot render (one line, naming where)."""


def add_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer with the chat markers added (a no-op for one that has them)."""
    return tokenizer.with_special_tokens(CHAT_TOKENS)


def chat_token_ids(tokenizer: Tokenizer, where: str = "tokenizer") -> dict[str, int]:
    ids = {t: tokenizer.token_id(t) for t in CHAT_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise TemplateError(f"{where}: has no chat tokens {missing} (add them with align.chat.add_chat_tokens)")
    return ids


def _encode_plain(tokenizer: Tokenizer, text: str, special_ids: set[int]) -> list[int]:
    """Text -> ids with no special token: a literal marker string is split so it stays bytes."""
    ids = tokenizer.encode(text)
    if not special_ids.intersection(ids):
        return ids
    out: list[int] = []
    for k, part in enumerate(re.split("(" + "|".join(map(re.escape, CHAT_TOKENS)) + ")", text)):
        if k % 2:                                     # a marker string: its first char, then the rest
            out += tokenizer.encode(part[:1]) + tokenizer.encode(part[1:])
        elif part:
            out += tokenizer.encode(part)
    return out


def apply_chat_template(tokenizer: Tokenizer, messages, add_generation_prompt: bool = False,
                        require_assistant: bool = True, where: str = "conversation") -> tuple[list[int], list[int]]:
    """messages [{"role": system|user|assistant, "content": str}, ...] -> (ids, loss_mask), equal lengths.

    require_assistant: training data must have an assistant turn to learn from; generation prompts
    (add_generation_prompt=True) need not. A system turn may only come first. Errors are one line."""
    if not isinstance(messages, list) or not messages:
        raise TemplateError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    ids_of = chat_token_ids(tokenizer)
    special = set(ids_of.values()) | {tokenizer.eod_id}
    ids: list[int] = []
    mask: list[int] = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise TemplateError(f"{where}: message {k} must be {{\"role\": one of {list(ROLES)}, \"content\": a string}}, "
                                f"got {str(m)[:80]}")
        if m["role"] == "system" and k != 0:
            raise TemplateError(f"{where}: message {k} is a system turn; only the first message may be one")
        body = [ids_of[ROLE_TOKENS[m["role"]]]] + _encode_plain(tokenizer, m["content"], special) + [ids_of[END_TOKEN]]
        learn = int(m["role"] == "assistant")
        ids += body
        mask += [0] + [learn] * (len(body) - 1)        # the role marker is given, the content and <|end|> learned
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise TemplateError(f"{where}: has no assistant turn (nothing to learn from)")
    if add_generation_prompt:
        ids.append(ids_of[ROLE_TOKENS["assistant"]])
        mask.append(0)
    return ids, mask
