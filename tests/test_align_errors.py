"""The post-training tools' bad input, each a one-line error (exit code 2) naming the field or file, before any
work: a conversation with no assistant turn, a preference pair with identical answers, beta <= 0, a DPO
reference checkpoint of another model, a conversation the template cannot render (at preprocessing and at
generation), a missing --pairs or --eval-pairs file, a pair too long for train.seq_len (naming file and line). The same messages at the library level: tests/test_sft.py, tests/test_dpo_rm.py."""
import importlib.util
import json
import os

from dist import spawn
from megagpt.align.chat import add_chat_tokens
from megagpt.data.tokenizer import Tokenizer
from test_dpo_rm import SEQ, _pref_cli, _save_other, mcfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_line_error(err: str, *needles, prefix="error: ") -> None:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _tok(tmp_path):
    tok = add_chat_tokens(Tokenizer.train([f"{a}+{b}={a + b}" for a in range(20) for b in range(20)], 300))
    path = str(tmp_path / "tok.json")
    tok.save(path)
    return tok, path


def test_preprocess_chat_errors(tmp_path, capsys):
    _, tok_path = _tok(tmp_path)
    tool = _tool("preprocess_chat")
    good = {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}
    cases = {
        "no_assistant": ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "1+1"}]},
                         "has no assistant turn"),
        "late_system": ({"messages": [{"role": "user", "content": "1+1"}, {"role": "system", "content": "s"},
                                      {"role": "assistant", "content": "2"}]}, "message 1 is a system turn"),
        "bad_role": ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "2"}]},
                     "message 0 must be"),
        "not_text": ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "2"}]},
                     "message 0 must be"),
    }
    for name, (bad, needle) in cases.items():
        src = tmp_path / f"{name}.jsonl"
        src.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        capsys.readouterr()
        assert tool.main(["--input", str(src), "--tokenizer", tok_path, "--output-prefix", str(tmp_path / name)]) == 2
        one_line_error(capsys.readouterr().err, f"{name}.jsonl:2", needle)


def test_generate_chat_template_that_does_not_render(tmp_path, capsys):
    """tools/generate.py --chat with a tokenizer that has no chat tokens: the template cannot render."""
    from test_sft import _save_plain
    plain = Tokenizer.train([f"{a}+{b}" for a in range(20) for b in range(20)], 300)
    path = str(tmp_path / "plain.json")
    plain.save(path)
    spawn(1, _save_plain, 308, str(tmp_path / "run"), timeout=120)
    tool = _tool("generate")
    assert tool.main(["--load", str(tmp_path / "run"), "--tokenizer", path, "--chat", "--prompt", "1+2=?",
                      "--greedy", "--max-new-tokens", "4"]) == 2
    one_line_error(capsys.readouterr().err, "has no chat tokens", prefix="generate: ")


def test_preference_errors_before_any_work(tmp_path, capfd):
    tok, tok_path = _tok(tmp_path)
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"{a}+1", "chosen": str(a + 1), "rejected": str(a + 2)}) + "\n"
                           for a in range(8)))
    arch = [f"model.{k}={v}" for k, v in mcfg(tok.vocab_size).items() if k != "vocab_size"] + [
        f"train.seq_len={SEQ}", "train.micro_batch_size=4", "train.global_batch_size=8", "train.eval_interval=0",
        "--train-iters", "2"]
    common = ["--pairs", str(src), "--tokenizer", tok_path, *arch]
    spawn(1, _save_other, tok.vocab_size, str(tmp_path / "other"), timeout=120)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "1+1", "chosen": "2", "rejected": "3"}) + "\n"
                    + json.dumps({"prompt": "1+1", "chosen": " ".join(["1+1=2"] * 20), "rejected": "3"}) + "\n")
    beta = ["dpo.beta: must be > 0"]
    runs = {"beta0": (["--beta", "0"], beta), "beta_neg": (["--beta", "-0.5"], beta),
            "ref": (["--reference", str(tmp_path / "other")], ["model.hidden_size", "other"]),
            "no_pairs": (["--pairs", str(tmp_path / "none.jsonl")], [f"{tmp_path / 'none.jsonl'}: pairs file not found"]),
            "no_eval": (["--eval-pairs", str(tmp_path / "held.jsonl")], [f"{tmp_path / 'held.jsonl'}: pairs file not found"]),
            "too_long": (["--eval-pairs", str(long)], ["long.jsonl:2: ", "do not fit train.seq_len"])}
    for name, (extra, needles) in runs.items():
        capfd.readouterr()
        assert spawn(1, _pref_cli, ["--mode", "dpo", "--run-dir", str(tmp_path / name), *common, *extra],
                     timeout=120) == [2]
        err = "\n".join(x for x in capfd.readouterr().err.splitlines() if x.startswith("error"))
        one_line_error(err, *needles)
        assert not (tmp_path / name / "metrics.jsonl").exists()           # no step ran
    src.write_text(json.dumps({"prompt": "q", "chosen": "1", "rejected": "1"}) + "\n")
    capfd.readouterr()
    assert spawn(1, _pref_cli, ["--mode", "rm", "--run-dir", str(tmp_path / "same"), *common], timeout=120) == [2]
    err = "\n".join(x for x in capfd.readouterr().err.splitlines() if x.startswith("error"))
    one_line_error(err, "p.jsonl:1: 'chosen' and 'rejected' are the same answer")
    assert not (tmp_path / "same").exists()
