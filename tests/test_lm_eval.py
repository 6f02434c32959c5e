"""The megagpt model in EleutherAI's lm-eval: a multiple-choice task from a local file scored through the
harness gives the log-likelihoods megagpt.evaluate computes; rolling and generate_until agree with direct
computations; tools/lm_eval_run.py runs `--model megagpt` offline from a checkpoint."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from megagpt import evaluate as ev  # noqa: E402
from megagpt.config import ModelConfig  # noqa: E402
from megagpt.data.tokenizer import Tokenizer  # noqa: E402
from megagpt.lm_eval_model import MegagptLM  # noqa: E402
from megagpt.loading import save_for_inference  # noqa: E402
from megagpt.model.gpt import build_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dict(vocab_size=300, max_seq_len=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
             ffn_hidden_size=64, make_vocab_divisible_by=1, init_std=0.1, use_flash_attn=False)
ROWS = [{"query": f"the capital of {c} is", "choices": ["paris", "madrid", "rome"], "gold": g}
        for c, g in [("frank", 0), ("spain", 1), ("ita", 2), ("span", 1)]]
YAML = """task: megagpt_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    tok = Tokenizer.train(["the capital of frank is paris. the capital of spain is madrid.\n"] * 20, vocab_size=290)
    tok.save(str(root / "tokenizer.json"))
    model = build_model(ModelConfig(**MODEL), seed=5).eval()
    save_for_inference(str(root / "run"), model, str(root / "tokenizer.json"))
    data = root / "capitals.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "capitals.yaml").write_text(YAML.format(data=data))
    return {"root": root, "model": model, "tok": tok, "tasks": str(tasks), "run": str(root / "run")}


def test_harness_loglikelihoods_equal_megagpt_scoring(setup, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    lm = MegagptLM(model=setup["model"], tokenizer=setup["tok"], batch_size=4)
    out = simple_evaluate(model=lm, tasks=["megagpt_capitals"], num_fewshot=0, log_samples=True,
                          task_manager=TaskManager(include_path=setup["tasks"], include_defaults=False))
    samples = out["samples"]["megagpt_capitals"]
    assert len(samples) == len(ROWS)
    tok, m = setup["tok"], setup["model"]
    right = 0
    for s in samples:
        row = ROWS[s["doc_id"]]
        got = [float(r[0][0]) for r in s["resps"]]                             # one (logprob, greedy) per choice
        want = [lp for lp, _ in ev.loglikelihood(m, [ev.encode_pair(tok, row["query"], " " + c) for c in row["choices"]])]
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
        right += max(range(3), key=lambda i: want[i]) == row["gold"]
    acc = out["results"]["megagpt_capitals"]["acc,none"]
    assert acc == pytest.approx(right / len(ROWS))
    exs = ev.read_task(str(setup["root"] / "capitals.jsonl"))
    assert ev.evaluate(m, tok, exs, 0)["accuracy"] == pytest.approx(acc)        # tools/evaluate.py agrees


def test_rolling_and_generate_until(setup):
    tok, m = setup["tok"], setup["model"]
    lm = MegagptLM(model=m, tokenizer=tok)
    text = "the capital of spain is madrid. " * 5                                 # > 32 tokens: several windows
    ids = tok.encode(text)
    assert len(ids) > MODEL["max_seq_len"]
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    want = 0.0
    seq = [tok.eod_id] + ids
    with torch.no_grad():
        for a in range(1, len(seq), 32):                                         # each token once, direct
            b = min(a + 32, len(seq))
            x = torch.tensor([seq[max(0, b - 33):b]])
            lp = torch.log_softmax(m.gather_logits(m(x[:, :-1]))[0].double(), -1)
            want += float(lp[-(b - a):].gather(1, x[0, -(b - a):, None]).sum())
    assert got == pytest.approx(want, rel=1e-5)
    reqs = [Instance("generate_until", {}, ("the capital of", {"until": ["."], "max_gen_toks": 5}), 0)]
    assert lm.generate_until(reqs) == ev.generate_until(m, tok, ["the capital of"], ["."], 5)


def test_cli_wrapper_runs_offline_from_a_checkpoint(setup, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "lm_eval_run.py"), "--model", "megagpt",
                        "--model_args", f"load={setup['run']}", "--tasks", "megagpt_capitals", "--include_path",
                        setup["tasks"], "--output_path", str(out), "--batch_size", "4"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    results = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.startswith("results")]
    acc = json.load(open(results[0]))["results"]["megagpt_capitals"]["acc,none"]
    exs = ev.read_task(str(setup["root"] / "capitals.jsonl"))
    assert acc == pytest.approx(ev.evaluate(setup["model"], setup["tok"], exs, 0)["accuracy"])
