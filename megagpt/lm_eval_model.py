"""A megagpt model for EleutherAI's lm-eval harness, registered as `--model megagpt`.

    python tools/lm_eval_run.py --model megagpt --model_args load=runs/tiny --tasks my_task \\
        --include_path my_tasks/ --batch_size 8

Importing this module registers the model. lm-eval 0.4 finds models only in its own table or through
`register_model`, and the plain `lm_eval` console script does not import megagpt, so
`tools/lm_eval_run.py` imports this module and then hands its argv to lm-eval's own CLI.
The three request types go to megagpt.evaluate, so lm-eval and `tools/evaluate.py` score the same
tokens the same way (one process, tp = pp = 1).
"""
from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from . import evaluate as ev


@register_model("megagpt")
class MegagptLM(LM):
    def __init__(self, load: str | None = None, model=None, tokenizer=None, batch_size: int | str = 16,
                 max_gen_toks: int = 256, **_ignored):
        """Either load=DIR (a megagpt checkpoint or HF directory; tokenizer= a tokenizer.json path to
        override its own), or model= a GPTModel and tokenizer= a megagpt Tokenizer (tests, notebooks)."""
        super().__init__()
        if model is None:
            from .loading import load_for_generation
            if not load:
                raise ValueError("megagpt: pass --model_args load=DIR (a checkpoint or HF directory)")
            chunks, _, tok, _ = load_for_generation(load, tokenizer=tokenizer)
            model, tokenizer = chunks, tok
        if tokenizer is None or isinstance(tokenizer, str):
            raise ValueError("megagpt: the checkpoint has no tokenizer; pass --model_args load=DIR,tokenizer=FILE")
        self.model, self.tok = model, tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16     # "auto" -> 16
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [ev.encode_pair(self.tok, ctx, cont) for ctx, cont in (r.args for r in requests)]
        out = ev.loglikelihood(self.model, pairs, self.batch_size)
        for r, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        return [ev.loglikelihood_rolling(self.model, self.tok, r.args[0], self.batch_size) for r in requests]

    def generate_until(self, requests) -> list[str]:
        out = []
        for r in requests:                      # one at a time: each request may bring its own stop strings
            context, kw = r.args
            kw = dict(kw or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if kw.get("do_sample"):
                raise ValueError("megagpt: generate_until decodes greedily; drop do_sample from the task")
            n = int(kw.get("max_gen_toks", self.max_gen_toks))
            out += ev.generate_until(self.model, self.tok, [context], until, n, self.batch_size)
        return out
