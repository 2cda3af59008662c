"""Training lab: train, evaluate, transfer, ablate, and watch features evolve.

``train(TrainConfig(...))`` runs a (resumable) training; ``evaluate`` scores a checkpoint;
``ablate`` trains architecture variants side by side. See ``convscope.training.loop``.
"""

from convscope.training.ablation import apply_variant, parse_variant
from convscope.training.data import TrainingData, load_training_data
from convscope.training.evaluate import Evaluation
from convscope.training.loop import TrainConfig, TrainProgress, TrainResult, resume, train

__all__ = [
    "Evaluation",
    "TrainConfig",
    "TrainProgress",
    "TrainResult",
    "TrainingData",
    "apply_variant",
    "load_training_data",
    "parse_variant",
    "resume",
    "train",
]
