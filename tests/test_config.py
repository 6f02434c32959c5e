"""Configs load, override and fail with a one-line error naming the field."""
import subprocess
import sys

import pytest

from megagpt.config import ConfigError, load_config, vocab_padding_note
from megagpt.model_size import count_params

SEED, B70, TINY = "examples/configs/gpt4plus-seed.yaml", "examples/configs/gpt4plus-70b.yaml", "examples/configs/tiny.yaml"


def test_flagship_parameter_counts():
    assert count_params(load_config(SEED).model) == 118_752_675_840
    assert count_params(load_config(B70).model) == 70_308_464_640


def test_dotted_overrides_are_typed():
    cfg = load_config(TINY, ["model.num_layers=6", "train.lr=2e-4", "parallel.sequence_parallel=true",
                             "parallel.tp=2"])
    assert cfg.model.num_layers == 6 and cfg.train.lr == 2e-4 and cfg.parallel.sequence_parallel is True


BAD = [
    (["model.hidden_sise=64"], "model.hidden_sise", "unknown key"),
    (["model.num_layers=two"], "model.num_layers", "expected int"),
    (["model.num_layers=2.5"], "model.num_layers", "expected int"),
    (["parallel.tp=3"], "model.num_heads", "not divisible by parallel.tp=3"),
    (["model.num_kv_heads=3"], "model.num_kv_heads", "does not divide"),
    (["model.hidden_size=100"], "model.hidden_size", "not divisible by model.num_heads"),
    (["parallel.tp=2", "parallel.pp=2"], "parallel.world_size", "not divisible by tp*cp*pp"),
    (["model.mlp=relu"], "model.mlp", "expected one of"),
    (["train.dtype=fp8"], "train.dtype", "expected one of"),
    (["model.hidden_dropout=1.5"], "model.hidden_dropout", "0 <= p < 1"),
    (["train.seq_len=4096"], "train.seq_len", "exceeds model.max_seq_len"),
    (["parallel.order=tp-dp-pp"], "parallel.order", "permutation"),
    (["parallel.pp=8"], "parallel.pp", "fewer than pp*vp"),
    (["parallel.vp=3", "parallel.pp=2"], "parallel.pp", "fewer than pp*vp=6"),
    (["parallel.layers_per_stage=[1,1]", "parallel.pp=2"], "parallel.layers_per_stage", "sums to 2"),
    (["train.min_lr=1.0"], "train.min_lr", "above train.lr"),
    (["model.rotary_fraction=0"], "model.rotary_fraction", "0 < fraction"),
    (["bogus.x=1"], "bogus.x", "section.field"),
    (["train.global_batch_size=15"], "train.global_batch_size", "not divisible"),
]


@pytest.mark.parametrize("overrides,field,fragment", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_config_names_the_field(overrides, field, fragment):
    world = 6 if "parallel.world_size" in field else None
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides, world_size=world)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert msg.startswith(field), msg
    assert fragment in msg, msg


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("model:\n  num_layers: 4\n  flavour: spicy\n")
    with pytest.raises(ConfigError, match="model.flavour: unknown key"):
        load_config(bad)


def test_vocab_padding_is_reported():
    cfg = load_config(TINY, ["model.vocab_size=2000", "parallel.tp=2"], world_size=2)
    assert cfg.model.padded_vocab(2) == 2048
    note = vocab_padding_note(cfg.model, 2)
    assert "2000 to 2048" in note


def test_cli_prints_one_line_error():
    out = subprocess.run([sys.executable, "examples/pretrain_70b.py", "--dry-run", "--tp", "3"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "parallel.tp=3" in out.stderr
