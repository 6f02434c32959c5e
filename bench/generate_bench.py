"""Generation benchmark (bench/run.py --only generate): KV-cache decoding against full recompute at 512
tokens of context, and against transformers' generate (with its own cache) on the same weights.

One process, one thread, fp32, batch 1, greedy, a 512-token prompt and 64 new tokens (no EOD stop). The
contenders run interleaved round by round; the table gives the median wall time of the whole call
(prefill included) and new tokens/s. The three must produce the same tokens (checked)."""
from __future__ import annotations

import time

import torch

from megagpt.checkpoint.hf import iter_megagpt_to_hf, to_hf_config
from megagpt.config import ModelConfig
from megagpt.model_size import count_params
from megagpt.generate import generate_ids, generate_recompute
from megagpt.model.gpt import build_model

MODEL = dict(hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=4, ffn_hidden_size=768, vocab_size=8192,
             max_seq_len=1024, use_flash_attn=False)
CONTEXT, NEW = 512, 64


def _hf_twin(model):
    import transformers
    transformers.logging.set_verbosity_error()
    cfg = model.cfg
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_config(cfg), attn_implementation="sdpa"))
    missing = hf.load_state_dict(dict(iter_megagpt_to_hf(model.state_dict().items(), cfg)), strict=False)
    assert not missing.unexpected_keys and not missing.missing_keys, missing
    return hf.eval()


def run_generate(rounds: int = 3, context: int = CONTEXT, new: int = NEW) -> dict:
    cfg = ModelConfig(**MODEL)
    model = build_model(cfg, seed=1234).eval()
    hf = _hf_twin(model)
    prompt = torch.randint(0, cfg.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))

    def cached():
        return generate_ids(model, prompt.tolist(), new)[0]

    def recompute():
        return generate_recompute(model, prompt, new)[0][0, context:].tolist()

    def transformers_generate():
        with torch.no_grad():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new,
                              min_new_tokens=new, pad_token_id=0, eos_token_id=None, use_cache=True)
        return out[0, context:].tolist()

    players = {"megagpt KV cache": cached, "megagpt recompute": recompute, "transformers generate": transformers_generate}
    times, outputs = {k: [] for k in players}, {}
    for r in range(rounds + 1):                                   # round 0 warms up
        for name, fn in (list(players.items()) if r % 2 else list(players.items())[::-1]):
            t0 = time.perf_counter()
            outputs[name] = fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    ref = outputs["megagpt recompute"]
    rows = []
    for name, ts in times.items():
        med = sorted(ts)[len(ts) // 2]
        rows.append({"impl": name, "seconds": med, "new_tokens_per_s": new / med, "same_tokens": outputs[name] == ref})
    base = {r["impl"]: r["seconds"] for r in rows}
    for r in rows:
        r["speedup_vs_recompute"] = base["megagpt recompute"] / r["seconds"]
        r["speedup_vs_transformers"] = base["transformers generate"] / r["seconds"]
    return {"params": count_params(cfg), "context": context, "new_tokens": new, "rounds": rounds, "rows": rows}


def print_generate(res: dict) -> None:
    print(f"\n== generation: {res['params'] / 1e6:.1f}M params, fp32, 1 thread, batch 1, greedy, "
          f"{res['context']}-token prompt + {res['new_tokens']} new tokens (median of {res['rounds']} rounds) ==")
    print(f"{'impl':<24}{'seconds':>9}{'new tok/s':>11}{'x recompute':>13}{'x transformers':>16}  same tokens")
    for r in res["rows"]:
        print(f"{r['impl']:<24}{r['seconds']:>9.3f}{r['new_tokens_per_s']:>11.1f}{r['speedup_vs_recompute']:>13.2f}"
              f"{r['speedup_vs_transformers']:>16.2f}  {r['same_tokens']}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    print_generate(run_generate())
