"""Training lab: train, evaluate, transfer, ablate, and watch features evolve.

``train(TrainConfig(...))`` runs a (resumable) training; ``evaluate`` scores a checkpoint;
``ablate`` trains architecture variants side by side.

The parts: ``config`` (``TrainConfig``, its resolution, the checks of a resume), ``schedule``
(the learning rate per step), ``state`` (one run in memory, and how it is built), ``rundir``
(what a run writes into its folder: save, restore, repair after a kill, snapshots, the result),
``loop`` (the epochs), with ``data``, ``checkpoint``, ``runrecord``, ``snapshots``, ``transfer``
and ``evaluate`` below them and ``ablation`` above.
"""

from convscope.models.variants import apply_variant, parse_variant
from convscope.training.config import TrainConfig
from convscope.training.data import TrainingData, load_training_data
from convscope.training.evaluate import Evaluation
from convscope.training.loop import resume, train
from convscope.training.state import TrainProgress, TrainResult

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
