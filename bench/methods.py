"""Every explanation-method benchmark of issue 3 in one command.

Runs ``bench/gradients.py`` (Grad-CAM / Grad-CAM++ vs pytorch-grad-cam; guided backprop,
saliency and deconv vs captum) and then ``bench/occlusion.py`` (exact and approximate
occlusion vs captum's ``Occlusion`` at its best ``perturbations_per_eval``), each in its own
process so that each sets up its own threads and allocator environment. Both print each
method's cost as a multiple of one forward pass of the same model, and ratios against the
peer measured in the same run.

    .venv/bin/python bench/methods.py                       # efficientnet_lite0, alexnet, vgg16
    .venv/bin/python bench/methods.py --models alexnet      # passed on to both scripts
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main() -> None:
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(__doc__)
        return
    here = Path(__file__).resolve().parent
    for script in ("gradients.py", "occlusion.py"):
        print(f"\n### bench/{script}", flush=True)
        code = subprocess.call([sys.executable, str(here / script), *sys.argv[1:]])
        if code:
            sys.exit(code)


if __name__ == "__main__":
    main()
