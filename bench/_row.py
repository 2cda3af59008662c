"""One machine-readable line per measured ratio, for ``bench/table.py`` (``make bench``).

Every bench script prints its own human report; each ratio it measures against a peer in the
same run is also printed as one ``BENCH-ROW {json}`` line, which the table collects. A row says
what was measured against what, the value, the target and which way is better, so the table
marks each row met or not without knowing the script.
"""

from __future__ import annotations

import json

PREFIX = "BENCH-ROW "


def row(method: str, peer: str, value: float, target: float, *, better: str = "higher",
        unit: str = "x faster", detail: str = "") -> None:
    """Print one ratio.

    Args:
        method: what convscope ran (``"Grad-CAM efficientnet_lite0"``).
        peer: what it was measured against in the same run (``"pytorch-grad-cam GradCAM"``).
        value: the ratio (``unit`` says which: "x faster" is the peer's time / ours).
        target: the issue's target for it.
        better: ``"higher"`` or ``"lower"``: which side of ``target`` is met.
        detail: settings worth printing next to it (batch, layer, equality).
    """
    if better not in ("higher", "lower"):
        raise ValueError("better must be 'higher' or 'lower'")
    print(PREFIX + json.dumps({"method": method, "peer": peer, "value": round(float(value), 4),
                               "target": target, "better": better, "unit": unit, "detail": detail}), flush=True)
