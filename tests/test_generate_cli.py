"""tools/generate.py: from a TP2 x PP2 checkpoint (resharded on load) or its HF export, in one process,
in forked ranks and under torchrun, with the one-line errors."""
import os
import subprocess
import sys

import pytest

from dist import spawn
from megagpt.checkpoint.sharded import save_checkpoint
from megagpt.config import Config, DataConfig, ModelConfig, ParallelConfig, TrainConfig
from megagpt.data.tokenizer import Tokenizer
from megagpt.generate import generate_ids
from megagpt.loading import load_for_generation
from megagpt.model.gpt import build_model
from megagpt.parallel.state import ParallelState
from megagpt.pipeline.split import build_stage
from megagpt.sampling import Sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import generate as tool  # noqa: E402

MODEL = dict(vocab_size=300, max_seq_len=32, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
             ffn_hidden_size=96, make_vocab_divisible_by=1, init_std=0.1, use_flash_attn=False)
PROMPT = [3, 141, 59, 26, 5]
SAMPLED = dict(do_sample=True, temperature=0.8, top_p=0.9, seed=4)


def _save_worker(rank, world, run_dir, tokenizer):
    ps = ParallelState.create(tp=2, pp=2)
    cfg = Config(model=ModelConfig(**MODEL), parallel=ParallelConfig(tp=2, pp=2, world_size=4),
                 train=TrainConfig(seq_len=32, micro_batch_size=1, global_batch_size=2),
                 data=DataConfig(tokenizer=tokenizer))
    save_checkpoint(run_dir, 3, build_stage(cfg, ps, seed=1234), ps, cfg, {})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tok_path = str(root / "tokenizer.json")
    Tokenizer.train(["to be or not to be, that is the question"] * 20, vocab_size=280).save(tok_path)
    run_dir = str(root / "run")
    spawn(4, _save_worker, run_dir, tok_path, timeout=120)
    ref = build_model(ModelConfig(**MODEL), seed=1234).eval()     # the same weights (drawn per name)
    return {"run": run_dir, "root": root, "ref": ref, "tok": tok_path}


def _ids(capsys, argv):
    assert tool.main(argv) == 0
    return [int(x) for x in capsys.readouterr().out.strip().splitlines()[-1].split()]


def test_one_process_from_tp2pp2_checkpoint(ckpt, capsys):
    want = generate_ids(ckpt["ref"], [PROMPT], 10)[0]
    got = _ids(capsys, ["--load", ckpt["run"], "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens",
                        "10", "--greedy", "--print-ids", "--no-eod"])
    assert got == want
    want = generate_ids(ckpt["ref"], [PROMPT], 10, Sampling(**SAMPLED))[0]
    got = _ids(capsys, ["--load", ckpt["run"], "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens",
                        "10", "--temperature", "0.8", "--top-p", "0.9", "--seed", "4", "--print-ids", "--no-eod"])
    assert got == want


def test_text_prompt_streams_and_hf_export(ckpt, capsys):
    from megagpt.checkpoint.convert import convert
    tok = Tokenizer.load(ckpt["tok"])
    prompt = tok.encode("to be or")
    want = generate_ids(ckpt["ref"], [prompt], 6, eod_id=tok.eod_id)[0]
    assert tool.main(["--load", ckpt["run"], "--prompt", "to be or", "--max-new-tokens", "6", "--print-ids"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [int(x) for x in lines[-1].split()] == want and lines[0] == tok.decode(want).strip().splitlines()[0]
    hf_dir = str(ckpt["root"] / "hf")
    convert(ckpt["run"], hf_dir, "hf")
    got = _ids(capsys, ["--load", hf_dir, "--prompt", "to be or", "--max-new-tokens", "6", "--print-ids"])
    assert got == want


def _rank_worker(rank, world, run_dir, tp, pp):
    chunks, ps, _, _ = load_for_generation(run_dir, tp, pp)
    return [generate_ids(chunks, [PROMPT, PROMPT[:2]], 8, ps=ps),
            generate_ids(chunks, [PROMPT, PROMPT[:2]], 8, Sampling(**SAMPLED), ps=ps)]


@pytest.mark.parametrize("tp,pp,world", [(2, 1, 2), (1, 2, 2), (1, 1, 2)])   # the last: DP2, two replicas
def test_ranks_reshard_on_load(ckpt, tp, pp, world):
    want = [generate_ids(ckpt["ref"], [PROMPT, PROMPT[:2]], 8),
            generate_ids(ckpt["ref"], [PROMPT, PROMPT[:2]], 8, Sampling(**SAMPLED))]
    for rank, got in enumerate(spawn(world, _rank_worker, ckpt["run"], tp, pp, timeout=120)):
        assert got == want, f"rank {rank}"


def test_under_torchrun(ckpt):
    want = generate_ids(ckpt["ref"], [PROMPT], 5)[0]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          os.path.join(ROOT, "tools", "generate.py"), "--load", ckpt["run"], "--tp", "2",
                          "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "5", "--print-ids",
                          "--no-eod"], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [int(x) for x in out.stdout.strip().splitlines()[-1].split()] == want


@pytest.mark.parametrize("argv,message", [
    (["--load", "/nonexistent/run"], "--load: /nonexistent/run: no such checkpoint directory"),
    (["--prompt-ids", ",".join(["1"] * 32)], "prompt: 32 tokens leave no room in the context of model.max_seq_len=32"),
    (["--prompt-ids", "1", "--top-p", "1.5"], "sampling.top_p: expected a number in (0, 1], got 1.5"),
    (["--prompt-ids", "1", "--top-p", "0"], "sampling.top_p: expected a number in (0, 1], got 0.0"),
    (["--prompt-ids", "1", "--tp", "3"], "model.num_heads: 4 is not divisible by parallel.tp=3"),
    (["--prompt-ids", "1", "--pp", "8"], "parallel.pp: 4 layers are fewer than"),
    (["--prompt-ids", "1", "--tp", "2"], "parallel: tp*pp=2*1 needs 2 ranks; launch with torchrun"),
])
def test_one_line_errors(ckpt, capsys, argv, message):
    if "--load" not in argv:
        argv = ["--load", ckpt["run"]] + argv
    assert tool.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"generate: {message}") and err.count("\n") == 1, err


def test_self_consistency_flag(ckpt, capsys):
    from megagpt.self_consistency import regex_extractor, self_consistency
    sampling = Sampling(do_sample=True, temperature=1.0, seed=2)
    extract = regex_extractor(r"(\w)\W*$", Tokenizer.load(ckpt["tok"]).decode)     # the last word character
    want = self_consistency(ckpt["ref"], PROMPT, 8, 6, sampling, extract)
    assert tool.main(["--load", ckpt["run"], "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "6",
                      "--temperature", "1.0", "--seed", "2", "--no-eod", "--self-consistency", "8",
                      "--answer-regex", r"(\w)\W*$"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 9 and want.answer is not None
    assert lines[-1] == f"answer: {want.answer}  agreement {want.agreement:.2f} ({want.counts})"


def test_stop_string(ckpt, capsys):
    tok = Tokenizer.load(ckpt["tok"])
    prompt = tok.encode("to be or")
    free = generate_ids(ckpt["ref"], [prompt], 12)[0]
    cut = next(i for i in range(1, len(free)) if tok.decode(free[:i]).strip())   # first token with visible text
    stop_text = tok.decode(free[:cut + 1])[-1]
    want = next(free[:i] for i in range(1, len(free) + 1) if stop_text in tok.decode(free[:i]))
    got = _ids(capsys, ["--load", ckpt["run"], "--prompt", "to be or", "--max-new-tokens", "12", "--print-ids",
                        "--no-eod", "--stop", stop_text])
    assert got == want and len(got) < len(free)
