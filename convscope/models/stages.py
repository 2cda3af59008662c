"""``ACTIVATIONS``: the one list of the modules convscope treats as a stage's nonlinearity
(ablation variants use it to drop a stage with its activation).

The stages of a user's module are measured, not guessed: ``wrap_model`` takes them from
``convscope.probes.layout.measure_module`` (at each resolution, the map the first downsampling
module reads, or timm's ``feature_info``); built-in models declare theirs in their ``ModelSpec``.
"""

from __future__ import annotations

from torch import nn

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.PReLU)
