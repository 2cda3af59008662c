"""Accuracy, per-class accuracy and the confusion matrix of a classifier on a dataset split."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from convscope.errors import DataError
from convscope.probes.hooks import eval_mode
from convscope.training.batches import BatchTransform
from convscope.training.data import Split


@dataclass(frozen=True)
class Evaluation:
    """How a classifier does on one split.

    Attributes:
        split: ``"train"``, ``"val"`` or ``"test"``.
        count: images evaluated.
        loss: mean cross-entropy.
        accuracy: fraction correct.
        per_class: ``(K,)`` float32 recall of each class (NaN for a class with no image).
        confusion: ``(K, K)`` int64, rows true class, columns predicted class.
        categories: the K class names.
        note: how the split was chosen, when that needs saying (the run's held-out split of its
            own training folder).
        includes_training: the images include ones the model was trained on (known when the
            checkpoint records its training data; see ``TrainedOn``).
    """

    split: str
    count: int
    loss: float
    accuracy: float
    per_class: torch.Tensor
    confusion: torch.Tensor
    categories: tuple[str, ...]
    note: str | None = None
    includes_training: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "count": self.count,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "error": 1.0 - self.accuracy,
            "per_class": {
                name: (None if math.isnan(value) else float(value))
                for name, value in zip(self.categories, self.per_class.tolist(), strict=True)
            },
            "confusion": self.confusion.tolist(),
            "categories": list(self.categories),
            "note": self.note,
            "includes_training_images": self.includes_training,
        }


@dataclass(frozen=True)
class TrainedOn:
    """The data a checkpoint's run trained on, as its ``config`` records it.

    Attributes:
        data: ``fashion-mnist``, ``digits`` or the folder, as given to ``train``.
        val_split: the run's ``--val-split`` (``None``: the default fraction). The held-out split
            is seeded independently of the run's seed (``load_training_data``'s ``split_seed``), so
            data, fraction and the model's preprocessing rebuild it exactly.
    """

    data: str
    val_split: float | None

    def matches(self, data: str | os.PathLike[str]) -> bool:
        """Whether ``data`` names the same dataset or folder (paths compared resolved)."""
        from pathlib import Path

        from convscope.training.data import BUILTIN_DATASETS

        name = os.fspath(data)
        if name in BUILTIN_DATASETS or self.data in BUILTIN_DATASETS:
            return name == self.data
        try:
            return Path(name).resolve() == Path(self.data).resolve()
        except (OSError, RuntimeError):
            return False


def trained_on(weights: str | os.PathLike[str]) -> TrainedOn | None:
    """The training data a convscope checkpoint records, or ``None`` (plain weights, no record).

    Raises:
        BadWeightsFile: unreadable or damaged file (as ``load_model``).
    """
    from convscope.models.weights import is_checkpoint, read_weights_file

    saved = read_weights_file(weights)
    config = saved.get("config") if is_checkpoint(saved) else None
    if not isinstance(config, dict) or not isinstance(config.get("data"), str):
        return None
    val_split = config.get("val_split")
    if val_split is not None and not isinstance(val_split, (int, float)):
        return None
    return TrainedOn(config["data"], None if val_split is None else float(val_split))


def autocast_for(device: torch.device, precision: str) -> Any:
    """Context for the forward pass: bfloat16 autocast, or nothing for float32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def evaluate_split(
    module: nn.Module,
    split: Split,
    transform: BatchTransform,
    categories: tuple[str, ...],
    *,
    batch_size: int = 512,
    precision: str = "fp32",
    label_map: torch.Tensor | None = None,
    progress: Callable[[int], None] | None = None,
) -> Evaluation:
    """Run ``module`` over ``split`` (eval mode, no grad) and count.

    Args:
        label_map: maps the split's label indices to the model's output indices (when the
            dataset orders or names classes differently); identity when ``None``.
        progress: called with the number of images after each batch.

    Returns:
        ``Evaluation`` over the model's ``categories``.
    """
    if len(split) == 0:
        raise DataError(split.name, "split has no images to evaluate")
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    k = len(categories)
    confusion = torch.zeros(k * k, dtype=torch.int64)
    loss_sum = 0.0
    with eval_mode(module), torch.inference_mode():
        for start in range(0, len(split), batch_size):
            pixels = split.images[start : start + batch_size]
            labels = split.labels[start : start + batch_size]
            if label_map is not None:
                labels = label_map[labels]
            x = transform(pixels).to(device)
            with autocast_for(device, precision):
                logits = module(x)
            logits = logits.float().cpu()
            if logits.shape[1] != k:
                raise DataError(split.name, f"the model has {logits.shape[1]} outputs but {k} classes are named")
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            confusion += torch.bincount(labels * k + logits.argmax(dim=1), minlength=k * k)
            if progress is not None:
                progress(len(labels))
    matrix = confusion.view(k, k)
    count = int(matrix.sum())
    per_class = matrix.diag().float() / matrix.sum(dim=1).float()
    return Evaluation(
        split=split.name,
        count=count,
        loss=loss_sum / count,
        accuracy=float(matrix.diag().sum()) / count,
        per_class=per_class,
        confusion=matrix,
        categories=tuple(categories),
    )


def label_mapping(data_categories: tuple[str, ...], model_categories: tuple[str, ...], source: str) -> torch.Tensor | None:
    """Index map dataset class -> model output, by name; ``None`` when they already agree.

    Raises:
        DataError: the dataset has classes the model does not know.
    """
    if tuple(data_categories) == tuple(model_categories):
        return None
    position = {name: i for i, name in enumerate(model_categories)}
    unknown = [name for name in data_categories if name not in position]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 5 else "")
        raise DataError(
            source, f"has classes the model was not trained on: {shown}",
            f"the model knows {len(model_categories)} classes: {', '.join(model_categories[:10])}",
        )
    return torch.tensor([position[name] for name in data_categories], dtype=torch.int64)


SPLITS = ("auto", "test", "val", "train", "all")


def evaluate(
    model: Any,
    data: str,
    *,
    split: str = "auto",
    batch_size: int = 512,
    limit: int | None = None,
    precision: str = "fp32",
    progress: Callable[[int], None] | None = None,
    trained: TrainedOn | None = None,
) -> Evaluation:
    """Score a classifier on a dataset split.

    Args:
        model: a ``LoadedModel`` (e.g. ``load_model(weights="run/best.pt")``) or a checkpoint path.
        data: ``fashion-mnist``, ``digits`` or a folder (see ``load_training_data``); images are
            prepared with the model's own preprocessing, and classes are matched by name.
        split: ``auto`` (the test split; for a folder with ``val/`` only, that one; for a flat
            class folder, every image in it), ``test``, ``val`` (the split training holds out by
            default to choose ``best.pt``: same fraction and seed), ``train`` (the training images
            without that split), or ``all`` (train + val + test).
        limit: cap the split at this many images (seeded subset).
        trained: the data the model was trained on (read from ``model`` when it is a checkpoint
            path; ``trained_on(path)`` otherwise). On that same folder, ``auto`` and ``val`` mean
            the run's own held-out split (its ``val_split``), so no training image is scored;
            when the run held nothing out, ``auto`` scores every image and the result says
            ``includes_training``.

    Raises:
        BadArgument: unknown split, or a split the data does not have.
        DataError: unusable data, or classes the model does not know.
    """
    from convscope.errors import BadArgument
    from convscope.models.load import load_model
    from convscope.training.data import load_training_data
    from convscope.training.wording import literal, option_error

    if split not in SPLITS:
        raise option_error(BadArgument, f"{{split}} {literal(split)}", "unknown split", "choose from: " + ", ".join(SPLITS))
    if isinstance(model, (str, os.PathLike)):
        trained = trained or trained_on(model)
        loaded = load_model(weights=model)
    else:
        loaded = model
    own = trained is not None and trained.matches(data)
    run_val_split = trained.val_split if own and trained is not None else None
    flat_folder = data not in ("fashion-mnist", "digits") and split in ("auto", "all") and not own
    dataset = load_training_data(
        data, preprocess=loaded.preprocess, val_split=0.0 if flat_folder else run_val_split, limit=limit
    )
    parts = {"train": dataset.train, "val": dataset.val, "test": dataset.test}
    note = None
    if split == "auto":
        chosen = dataset.test or dataset.val or dataset.train
        if chosen is dataset.train:
            chosen = Split("all", dataset.train.images, dataset.train.labels)
        elif own and chosen is dataset.val and dataset.test is None:
            note = (
                f"{data} is the folder this model was trained on: scoring the run's held-out split "
                f"({len(chosen)} images; {dataset.validation}), not its training images"
            )
    elif split == "all":
        present = [s for s in parts.values() if s is not None]
        chosen = Split("all", torch.cat([s.images for s in present]), torch.cat([s.labels for s in present]))
    else:
        if split == "val" and dataset.val is None and data not in ("fashion-mnist", "digits") and not own:
            dataset = load_training_data(data, preprocess=loaded.preprocess, limit=limit)
            parts["val"] = dataset.val
        found = parts[split]
        if found is None:
            have = ", ".join(name for name, s in parts.items() if s is not None)
            raise option_error(BadArgument, f"{{split}} {split}", literal(f"{data} has no {split} split"), f"it has: {have}")
        chosen = found
    includes_training = own and (split in ("train", "all") or chosen.name == "all")
    mapping = label_mapping(dataset.categories, loaded.categories, data)
    transform = BatchTransform(loaded.preprocess)
    result = evaluate_split(
        loaded.module, chosen, transform, tuple(loaded.categories), batch_size=batch_size,
        precision=precision, label_map=mapping, progress=progress,
    )
    return replace(result, note=note, includes_training=includes_training)
