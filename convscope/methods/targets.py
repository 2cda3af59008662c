"""Which class score a gradient method explains: top-1, an index, or a label name."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import torch

from convscope.errors import BadTarget, close_matches

TargetLike = int | str | Sequence[int | str] | torch.Tensor | None


def resolve_label(name: str, categories: Sequence[str], model_name: str = "model") -> int:
    """Class name -> index: exact match first, then case-insensitive, then a unique comma-
    separated alias (``"tabby"`` for ``"tabby, tabby cat"``).

    Raises:
        BadTarget: unknown or ambiguous name, with close matches.
    """
    labels = list(categories)
    if name in labels:
        return labels.index(name)
    folded = name.strip().casefold()
    matches = [i for i, label in enumerate(labels) if label.casefold() == folded]
    if not matches:
        matches = [
            i
            for i, label in enumerate(labels)
            if folded in (part.strip().casefold() for part in label.split(","))
        ]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise BadTarget(
            f"--label {name}",
            f"matches {len(matches)} classes of {model_name}",
            "use --class with one of " + ", ".join(str(i) for i in matches),
        )
    raise BadTarget(f"--label {name}", f"is not a class of {model_name}", label_suggestions(name, labels))


def label_suggestions(name: str, labels: Sequence[str], limit: int = 6) -> str:
    """``did you mean: ...`` for an unknown label: labels containing ``name`` as a word first
    (``cat`` -> ``tiger cat``, ``Egyptian cat``), then those containing it anywhere, then spelling
    neighbours (``tabyy`` -> ``tabby``)."""
    import re

    folded = name.strip().casefold()
    if not folded:
        return close_matches(name, list(labels))
    word = re.compile(rf"(?<![\w]){re.escape(folded)}(?![\w])")
    as_word = [label for label in labels if word.search(label.casefold())]
    inside = [label for label in labels if folded in label.casefold() and label not in as_word]
    found = (as_word + inside)[:limit]
    if not found:
        return close_matches(name, list(labels))
    more = len(as_word) + len(inside) - len(found)
    return "did you mean: " + ", ".join(found) + (f" (and {more} more)" if more > 0 else "")


def _one(value: int | str, num_classes: int, categories: Sequence[str], model_name: str) -> int:
    if isinstance(value, torch.Tensor):
        value = int(value.item())
    if isinstance(value, str):
        return resolve_label(value, categories, model_name)
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"a target is a class index or a label name, not {type(value).__name__}")
    value = int(value)
    if not 0 <= value < num_classes:
        raise BadTarget(
            f"--class {value}",
            f"is out of range: {model_name} has {num_classes} classes (0..{num_classes - 1})",
        )
    return value


def resolve_targets(
    target: TargetLike,
    logits: torch.Tensor,
    categories: Sequence[str] = (),
    model_name: str = "model",
) -> torch.Tensor:
    """Targets for a batch.

    Args:
        target: ``None`` (each image's top-1 class), an index or label for every image, or one
            index/label per image (a sequence or a 1-D tensor of length N).
        logits: ``(N, num_classes)`` model outputs.
        categories: class names for label lookup.

    Returns:
        ``(N,)`` int64 on ``logits.device``.

    Raises:
        BadTarget: index out of range, unknown label, or a per-image list of the wrong length.
    """
    if isinstance(logits, (tuple, list, dict)):  # timm features_only, aux heads in train mode...
        from convscope.models.external import describe_output

        raise BadTarget(model_name, f"returns {describe_output(logits)}",
                        "pick the logits with --output-index N / output_index=N")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        what = f"shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise BadTarget(
            model_name, f"outputs {what}, not (N, classes) scores",
            "explain a classifier, or wrap the model so it returns one (N, classes) tensor",
        )
    count, num_classes = logits.shape
    if target is None:
        return logits.detach().argmax(dim=1)
    if isinstance(target, torch.Tensor) and target.dim() == 0:
        target = int(target.item())
    if isinstance(target, (Integral, str)):
        values = [_one(target, num_classes, categories, model_name)] * count
    else:
        items = target.tolist() if isinstance(target, torch.Tensor) else list(target)  # type: ignore[arg-type]
        if len(items) != count:
            raise BadTarget(
                "target", f"gives {len(items)} class{'es' if len(items) != 1 else ''} for {count} image{'s' if count != 1 else ''}", "give one per image or one for all"
            )
        values = [_one(item, num_classes, categories, model_name) for item in items]
    return torch.tensor(values, dtype=torch.int64, device=logits.device)


def target_labels(targets: torch.Tensor, categories: Sequence[str]) -> tuple[str, ...]:
    """Class names of ``targets`` (``class K`` where the model has no names)."""
    return tuple(
        categories[i] if i < len(categories) else f"class {i}" for i in targets.tolist()
    )
