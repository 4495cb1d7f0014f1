"""Every config file loads and validates; impossible values fail naming the key and the fix."""
import os
import subprocess
import sys

import pytest

from hiss_jax.train import config_check
from hiss_jax.train.config_check import ConfigError, check_config, load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("s4", "mamba", "mamba2", "lstm", "transformer")
CSP = ("marker_writing", "intrinsic_slip", "joystick", "ronin", "vector", "totalcapture")


def _load(spec):
    return load_config_file(os.path.join(ROOT, spec))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("arg", ["", ":flat", ":tiny", ":flat,tiny", ":tiny,flat"])
def test_family_configs_validate(family, arg):
    config = _load(f"configs/{family}.py{arg}")
    check_config(config, 1)
    assert config.model.type == ("flat" if "flat" in arg else "hiss")
    level = config.model.flat if "flat" in arg else config.model.low
    assert level.kind == family and config.model.high.kind == family
    if "tiny" in arg:
        assert config.train.num_steps <= 20 and level.d_model <= 16


@pytest.mark.parametrize("name", CSP)
def test_csp_presets_use_the_paper_training_defaults(name):
    config = _load(f"configs/csp.py:{name}")
    config.data.dir = "/data/csp"
    check_config(config, 1)
    assert config.data.name == f"csp:{name}"
    assert (config.optim.name, config.optim.lr, config.optim.schedule) == ("adam", 1e-4, "constant")
    assert config.optim.weight_decay == 0 and config.optim.clip_norm == 0
    assert (config.train.batch_size, config.train.num_epochs, config.train.seed) == (4, 300, 5)
    assert config.model.low.kind in ("s4", "mamba") and config.model.high.d_model >= 64


def test_csp_best_pairs_match_the_paper():
    vector = _load("configs/csp.py:vector").model
    assert (vector.low.kind, vector.low.d_model, vector.low.n_layers) == ("mamba", 32, 4)
    assert (vector.high.kind, vector.high.d_model, vector.high.n_layers) == ("mamba", 64, 4)
    ronin = _load("configs/csp.py:ronin").model
    assert (ronin.high.kind, ronin.high.d_model, ronin.high.n_layers) == ("s4", 128, 6)


@pytest.mark.parametrize("spec, match", [
    ("configs/mamba2.py:huge", r"unknown \['huge'\].*'flat', 'tiny'"),
    ("configs/csp.py", "exactly one dataset.*'vector'"),
    ("configs/csp.py:vector,ronin", "exactly one dataset"),
])
def test_bad_config_args_name_the_allowed_words(spec, match):
    with pytest.raises(ValueError, match=match):
        _load(spec)


def _set(config, key, value):
    *parents, last = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[last] = value


@pytest.mark.parametrize("key, value, n_devices, match", [
    ("model.low.kind", "gru", 1,
     r"config.model.low.kind='gru'.*\['s4', 'mamba', 'mamba2', 'lstm', 'transformer'\]"),
    ("model.type", "deep", 1, r"config.model.type='deep'.*\['hiss', 'flat', 'multibranch'\]"),
    ("model.chunk_size", 0, 1, r"config.model.chunk_size=0 must be a positive integer"),
    ("model.high.n_layers", -1, 1, r"config.model.high.n_layers=-1"),
    ("model.low.dropout", 1.5, 1, r"config.model.low.dropout=1.5 must be in \[0, 1\)"),
    ("data.name", "csp:nope", 1, r"config.data.name='csp:nope'.*'csp:vector'.*'synthetic:imu'"),
    ("kernels.impl", "cuda", 1, r"config.kernels.impl='cuda'.*\['auto', 'ref', 'xla', 'pallas'\]"),
    ("optim.name", "sgd", 1, r"config.optim.name='sgd'.*\['adam', 'adamw'\]"),
    ("optim.schedule", "step", 1, r"config.optim.schedule='step'.*'cosine'"),
    ("optim.weight_decay", 0.1, 1,
     r"config.optim.weight_decay=0.1 needs config.optim.name='adamw'"),
    ("train.batch_size", 6, 4,
     r"config.train.batch_size=6 is not divisible by the data-axis size 4"),
    ("mesh.data", 3, 4, r"config.mesh.data=3 x config.mesh.model=1 does not match the 4"),
    ("model.low.mamba2.n_groups", 3, 1,
     r"config.model.low.mamba2.n_groups=3 must divide the number of heads 4.*\[1, 2, 4\]"),
    ("model.low.s4.mode", "nplr", 1, r"config.model.low.s4.mode='nplr'.*\['dplr', 'diag'\]"),
])
def test_impossible_values_name_the_key_and_allowed_values(key, value, n_devices, match):
    config = _load("configs/mamba2.py")
    if key.startswith("model.low.s4"):
        config.model.low.kind = "s4"
    _set(config, key, value)
    with pytest.raises(ConfigError, match=match):
        check_config(config, n_devices)


def test_transformer_heads_must_divide_width():
    config = _load("configs/transformer.py")
    config.model.high.transformer.n_heads = 3
    with pytest.raises(ConfigError, match=r"config.model.high.d_model=64 is not divisible by "
                                          r"config.model.high.transformer.n_heads=3"):
        check_config(config, 1)


def test_csp_without_data_dir_says_how_to_set_it():
    with pytest.raises(ConfigError, match="--config.data.dir="):
        check_config(_load("configs/csp.py:joystick"), 1)


def test_unknown_override_names_the_key_and_the_allowed_fields():
    message = config_check.explain_flag_error(
        AttributeError("'foo'"), ["--config=configs/mamba2.py", "--config.model.low.foo=1"])
    assert "config.model.low has no field 'foo'" in message and "'d_model'" in message
    proc = subprocess.run([sys.executable, "train.py", "--config", "configs/mamba2.py",
                           "--config.train.bach_size=3"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "config.train has no field 'bach_size'" in proc.stderr
    assert "'batch_size'" in proc.stderr
