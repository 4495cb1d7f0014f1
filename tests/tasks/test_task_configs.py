"""Task configs load for every family, build their model, and the suite tabulates results."""
import json
import os

import jax
import jax.numpy as jnp
import pytest

from hiss_jax.tasks import suite
from hiss_jax.tasks.lm import build_token_model
from hiss_jax.train.config_check import load_config_file
from hiss_jax.train.state import param_count

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(spec):
    return load_config_file(os.path.join(ROOT, spec))


def _params(config, vocab):
    model = build_token_model(config.model, vocab)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    return param_count(shapes["params"])


@pytest.mark.parametrize("task", ["selective_copy", "pig_latin"])
@pytest.mark.parametrize("arg", ["", "mamba2", "s4", "transformer", "lstm", "mamba,tiny"])
def test_task_configs_load_and_build(task, arg):
    config = _load(f"configs/{task}.py" + (f":{arg}" if arg else ""))
    assert config.task.name == task
    assert config.model.kind == (arg.split(",")[0] or "mamba")
    assert _params(config, 30) > 0
    if "tiny" in arg:
        assert config.model.d_model <= 64 and config.train.num_steps <= 3000


def test_selective_copy_mamba_has_about_a_million_parameters():
    config = _load("configs/selective_copy.py")
    assert (config.task.seq_len, config.task.n_data, config.task.vocab_size) == (128, 16, 30)
    assert 0.9e6 <= _params(config, config.task.vocab_size) <= 1.1e6


def test_bad_config_arg_names_the_allowed_words():
    with pytest.raises(ValueError, match="several families"):
        _load("configs/selective_copy.py:mamba,s4")
    with pytest.raises(ValueError, match="allowed words"):
        _load("configs/pig_latin.py:gru")


def test_suite_tables_and_overrides(tmp_path):
    r = {"kind": "mamba", "params": 1000, "steps": 10, "token_acc": 0.975, "seq_acc": 0.5,
         "loss": 0.1, "train_time_s": 3.0}
    os.makedirs(tmp_path / "copy_mamba")
    (tmp_path / "copy_mamba" / "results.json").write_text(json.dumps(r))
    os.makedirs(tmp_path / "pig_mamba")
    (tmp_path / "pig_mamba" / "results.json").write_text(
        json.dumps({**r, "exact_word_acc": 0.99, "n_words": 2000}))
    text = suite.tables(str(tmp_path))
    assert "| copy_mamba | mamba | default | 1,000 | 10 | 97.50% | 50.00%" in text
    assert "| copy_s4 | s4 | default | - | - | not run" in text
    assert "99.00% (2000 words)" in text and (tmp_path / "TABLES.md").exists()
    os.makedirs(tmp_path / "copy_s4")
    (tmp_path / "copy_s4" / "error.txt").write_text("TIMEOUT after 10 s\n")
    assert "| copy_s4 | s4 | default | - | - | TIMEOUT after 10 s" in suite.tables(str(tmp_path))
    assert suite._parse_sets(["train.num_steps=7", "model.mamba.disc=zoh"]) == {
        "train.num_steps": "7", "model.mamba.disc": "zoh"}
    with pytest.raises(SystemExit, match="key=value"):
        suite._parse_sets(["train.num_steps"])
