"""HiSS models: one linen Stack per block family, the hierarchical / flat / multi-branch models and
the registry that builds them from `config.model` (`build_model`)."""
from hiss_jax.models.hiss import FlatModel, HierarchicalModel, LevelModel, MultiBranchModel
from hiss_jax.models.registry import SSM_PARAM_NAMES, STACKS, build_model, make_stack

__all__ = ["build_model", "make_stack", "STACKS", "SSM_PARAM_NAMES", "LevelModel",
           "HierarchicalModel", "FlatModel", "MultiBranchModel"]
