"""Class names per label set. The ImageNet list is data (``imagenet_classes.txt``)."""

from __future__ import annotations

from functools import cache
from importlib import resources

FASHION_MNIST = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10 = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
DIGITS = tuple(str(d) for d in range(10))


@cache
def _imagenet() -> tuple[str, ...]:
    text = resources.files("convscope.models").joinpath("imagenet_classes.txt").read_text("utf-8")
    names = tuple(line for line in text.splitlines() if line)
    assert len(names) == 1000, "imagenet_classes.txt must hold 1000 names"
    return names


def get_labels(key: str) -> tuple[str, ...]:
    """Class names for a label-set key (``imagenet``, ``fashion_mnist``, ``cifar10``, ``digits``)."""
    if key == "imagenet":
        return _imagenet()
    table = {"fashion_mnist": FASHION_MNIST, "cifar10": CIFAR10, "digits": DIGITS}
    return table[key]
