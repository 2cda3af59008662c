"""Occlusion sensitivity (Zeiler & Fergus 2014, §4.2 and Fig. 7), fast and exact.

The public function and its result live in ``method``; the rest is how the occluded copies are
computed, from the top down:

* ``engine``: every occluded copy of one image, in chunks (``occlude_image`` -> ``ImageOcclusion``);
* ``precision``: the probe that decides whether approximate mode runs in half precision;
* ``chain``: how far along the network the incremental computation goes, checked on the image;
* ``units``, ``plan``, ``replay``: the incremental engine (Nakandala et al. 2019): which modules
  are local, where each copy's changed patch lies in each of them, and how the patches are
  computed and handed to the rest of the network. ``replay``'s docstring explains the idea.

Spatial reach per module comes from ``convscope.probes.geometry.reach``, the one table.
"""

from convscope.methods.occlusion.method import (
    FILL_COLOURS,
    MODES,
    OcclusionResult,
    OcclusionStats,
    grid_origins,
    occlusion,
    resolve_fill,
)

__all__ = ["FILL_COLOURS", "MODES", "OcclusionResult", "OcclusionStats", "grid_origins", "occlusion", "resolve_fill"]
