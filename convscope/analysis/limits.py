"""Caps on the sizes a user gives the measurements, checked before anything is allocated.

Light on purpose (no torch): the CLI names these numbers in ``--help`` and checks its options
against them before it loads a model.
"""

from __future__ import annotations

# Invariance transforms every image once per amount, and one image's copies run as one stack, so
# the number of amounts bounds both the time and the memory of a run. 1000 is 27 times the paper's
# longest list (rotation in steps of 10 degrees) and allows rotation in steps of 0.5 degrees.
MAX_AMOUNTS = 1000

# Largest amount by magnitude: a shift of a million network pixels or a zoom of a million already
# leaves nothing of the picture, and the limit keeps the geometry's arithmetic finite.
MAX_AMOUNT = 1e6

# A parts file for correspondence (part name -> boxes) is a few kilobytes even for thousands of
# images; the cap stops a wrong path (a model file, a device) from being read into memory.
MAX_PARTS_BYTES = 4 * 2**20

# Random box sets of the correspondence control: each one is a forward pass over every image.
MAX_RANDOM = 10_000
