"""config_check: the discretisation of Mamba and S4 levels is one of the allowed values."""
import pytest

from configs import mamba, s4
from hiss_jax.train.config_check import ConfigError, check_config


@pytest.mark.parametrize("family, disc", [(mamba, d) for d in ("approx_zoh", "zoh", "bilinear")]
                         + [(s4, d) for d in ("bilinear", "zoh", "approx_zoh")])
def test_every_discretisation_validates(family, disc):
    config = family.get_config("tiny")
    kind = config.model.low.kind
    config.model.low[kind].disc = disc
    check_config(config, 1)


@pytest.mark.parametrize("family, match", [
    (mamba, r"config.model.low.mamba.disc='euler' is not allowed; use one of "
            r"\['approx_zoh', 'zoh', 'bilinear'\]"),
    (s4, r"config.model.low.s4.disc='euler' is not allowed; use one of "
         r"\['bilinear', 'zoh', 'approx_zoh'\]"),
])
def test_unknown_discretisation_names_the_value_and_the_allowed_ones(family, match):
    config = family.get_config("tiny")
    config.model.low[config.model.low.kind].disc = "euler"
    with pytest.raises(ConfigError, match=match):
        check_config(config, 1)


def test_level_configs_default_to_each_family_s_discretisation():
    config = mamba.get_config()
    assert config.model.low.mamba.disc == "approx_zoh" and config.model.low.s4.disc == "bilinear"
