"""Conv stages of a network nobody described: the activation after each convolution.

Used by ``wrap_model`` for a user's module; built-in models declare their stages in their
``ModelSpec``. ``ACTIVATIONS`` is the one list of the modules convscope treats as a stage's
nonlinearity (variants use it to drop a stage with its activation).
"""

from __future__ import annotations

from torch import nn

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.PReLU)


def default_stages(module: nn.Module) -> dict[str, str]:
    """Guess conv stages of a user module: for each ``Conv2d``, the first activation registered
    after it (before the next conv), else the conv itself. Names are ``conv1``, ``conv2``...

    Registration order follows forward order for Sequential-style networks; wrap other
    networks with explicit stages.
    """
    stages: dict[str, str] = {}
    current: str | None = None  # the stage output found so far for the latest conv
    activated = False
    for path, sub in module.named_modules():
        if isinstance(sub, nn.Conv2d):
            if current is not None:
                stages[f"conv{len(stages) + 1}"] = current
            current, activated = path, False
        elif current is not None and not activated and isinstance(sub, ACTIVATIONS):
            current, activated = path, True
    if current is not None:
        stages[f"conv{len(stages) + 1}"] = current
    return stages
