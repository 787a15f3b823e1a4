"""Training: NeMo's QuartzNet recipe (CTC, NovoGrad, cosine annealing, SpecAugment) on
``tf.distribute``, with checkpoints that survive a killed run, validation WER/CER and export of
the best model. Imports no Beam, pipeline or serving code."""

from qn_keras.training.config import ConfigError, TrainConfig, load_config
from qn_keras.training.distribution import make_strategy
from qn_keras.training.schedules import CosineAnnealing
from qn_keras.training.trainer import Trainer, TrainingDivergedError, TrainingResult, train

__all__ = [
    "ConfigError",
    "CosineAnnealing",
    "TrainConfig",
    "Trainer",
    "TrainingDivergedError",
    "TrainingResult",
    "load_config",
    "make_strategy",
    "train",
]
