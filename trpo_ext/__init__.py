"""trpo_ext: TRPO for PyTorch and gymnasium with fused Fisher-vector products and CG.

    import trpo_ext
    agent = trpo_ext.TRPO("CartPole-v1", seed=0)
    agent.learn(100_000)
"""
from . import reference, safety_envs, toy_envs
from ._ops import cuda_built
from .multicategorical import MultiCategorical
from .fisher import CGInfo, cg_solve, fvp
from .policies import FeaturePolicy, FeatureValue, MLPPolicy, NatureCNN, ValueNetwork
from .spaces import Sequences
from .step import StepRecord, trust_region_step
from .constrained import ConstrainedStepRecord, constrained_step
from .trpo import TRPO

toy_envs.register()  # the "trpo_ext/..." example envs (trpo_ext.toy_envs)
safety_envs.register()  # the "trpo_ext/..." cost-constrained tasks (trpo_ext.safety_envs)

__all__ = ["TRPO", "Sequences", "MLPPolicy", "ValueNetwork", "FeaturePolicy", "FeatureValue", "NatureCNN", "MultiCategorical",
           "trust_region_step", "StepRecord", "constrained_step", "ConstrainedStepRecord",
           "fvp", "cg_solve", "CGInfo", "reference", "cuda_built"]
__version__ = "0.1.0"
