"""Architecture search over QuartzNet's blocks, repeats, groups, width and kernels with Keras
Tuner, training every trial with the project's trainer (``qn tune``)."""

from qn_keras.tuning.config import TuneConfig, load_tune_config, parse_duration
from qn_keras.tuning.search import run_search
from qn_keras.tuning.tuner import QuartzNetHyperModel, QuartzNetTuner, make_oracle

__all__ = [
    "QuartzNetHyperModel",
    "QuartzNetTuner",
    "TuneConfig",
    "load_tune_config",
    "make_oracle",
    "parse_duration",
    "run_search",
]
