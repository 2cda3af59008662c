"""Feature visualisation vs Lucent (``torch-lucent``): time per unit and the objective reached.

Same model (pretrained EfficientNet-Lite0), same layer (a middle stage, ``stage4`` by default),
same steps, image size (128), Fourier parameterisation with decorrelated colours, Adam at lr
0.05, in one run. Lucent runs one unit at a time, as ``render_vis`` does; ours runs ``--units``
units in one batched optimisation. Lucent's units are split around ours (half before, half after)
so both see the same machine load.

Fairness notes:

* Transforms: Lucent's ``standard_transforms`` without ``random_rotate`` and ours with
  ``transforms="no-rotation"`` to match: Lucent's rotation calls ``kornia.get_rotation_matrix2d``,
  which kornia 0.5 and later no longer have (an AttributeError with kornia 0.9). ``--rotate``
  puts the rotation back on both sides; it needs the kornia Lucent pins (<= 0.4.1, which runs
  under torch 2.14).
* Lucent's loop is ``render_vis``'s, written out here for two reasons: ``render_vis`` upsamples
  images under 224 pixels to 224 before the network (ours feeds the 128-pixel image as is), and
  it normalises with ImageNet's mean and std (EfficientNet-Lite wants 0.5 / 0.5). Everything
  else is Lucent's own: ``param.image``, its transforms, ``hook_model`` (a hook on every module),
  ``objectives.channel`` and ``torch.optim.Adam``; the model is a copy in eval mode, used as
  Lucent's tutorials do (parameters keep ``requires_grad``, the whole network runs each step).
* ``convscope.tune_cpu()`` is called first (what the CLI does); it is process-wide, so Lucent
  gets the same allocator.
* Both final images are scored by the same function, ``methods.featurevis.unit_objective``
  (channel mean at the layer, no transforms, the model's normalisation).

Rows: Lucent's seconds per unit / ours (target >= 5), and the median over units of our final
objective / Lucent's (target >= 0.9).

    .venv/bin/python bench/featurevis.py [--steps 512] [--units 32] [--peer-units 32] [--layer stage4]
        [--size 128] [--threads 0] [--rotate]

``--peer-units K`` runs Lucent on the first K units only (its time per unit does not depend on
how many it runs); the objective ratio is then the median over those K.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

import numpy as np
import torch
from _row import row  # bench/_row.py: the BENCH-ROW line of bench/table.py

from convscope.methods.featurevis import feature_visualization, unit_objective
from convscope.models.load import load_model
from convscope.probes.layers import resolve_layer
from convscope.runtime import tune_cpu

SCALES = [1 + (i - 5) / 50.0 for i in range(11)]


def lucent_unit(net: torch.nn.Module, hook_name: str, unit: int, steps: int, size: int,
                mean: torch.Tensor, std: torch.Tensor, seed: int, rotate: bool = False) -> torch.Tensor:
    """One unit with Lucent's pieces (``render_vis``'s loop without its upsampling): its final
    image ``(1, 3, size, size)`` in ``[0, 1]``."""
    from lucent.optvis import objectives, param, transform
    from lucent.optvis.render import hook_model

    torch.manual_seed(seed)
    np.random.seed(seed)
    params, image_f = param.image(size, fft=True, decorrelate=True)
    optimizer = torch.optim.Adam(params, lr=0.05)
    rotation = [transform.random_rotate(list(range(-10, 11)) + 5 * [0])] if rotate else []
    transforms = transform.compose([
        transform.pad(12, mode="constant", constant_value=0.5),
        transform.jitter(8),
        transform.random_scale(SCALES),
        *rotation,
        transform.jitter(4),
        lambda x: (x - mean) / std,  # the model's own normalisation
    ])
    hook = hook_model(net, image_f)
    objective = objectives.as_objective(objectives.channel(hook_name, unit))
    for _ in range(steps):
        optimizer.zero_grad()
        net(transforms(image_f()))
        loss = objective(hook)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return image_f().detach().clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=512)
    parser.add_argument("--units", type=int, default=32, help="units ours optimises in one batch")
    parser.add_argument("--peer-units", type=int, default=None, help="units Lucent runs (default: --units)")
    parser.add_argument("--layer", default="stage4")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--rotate", action="store_true", help="rotation on both sides (kornia <= 0.4.1)")
    args = parser.parse_args()
    kind = "standard" if args.rotate else "no-rotation"
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    tune = tune_cpu()
    loaded = load_model("efficientnet_lite0", device="cpu")
    path, _ = resolve_layer(loaded, args.layer)
    hook_name = path.replace(".", "_")  # Lucent names layers by their path joined with "_"
    units = list(range(args.units))
    peer_units = units[: args.peer_units or args.units]
    mean = torch.tensor(loaded.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.preprocess.std).view(1, 3, 1, 1)
    peer_net = copy.deepcopy(loaded.module).eval()  # Lucent's hooks stay on it for good
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {tune.note}; layer {args.layer} "
          f"({path}), {args.steps} steps at {args.size} px; ours {len(units)} units batched, Lucent "
          f"{len(peer_units)} one at a time; load {os.getloadavg()[0]:.2f}", flush=True)

    # Warm-up (first-call costs of both, a few steps each).
    feature_visualization(loaded, args.layer, units[:2], steps=2, size=args.size, transforms=kind)
    lucent_unit(copy.deepcopy(loaded.module).eval(), hook_name, 0, 2, args.size, mean, std, 0, args.rotate)

    peer_images: dict[int, torch.Tensor] = {}
    peer_seconds = 0.0
    half = len(peer_units) // 2

    def run_peer(chosen: list[int]) -> None:
        nonlocal peer_seconds
        for unit in chosen:
            started = time.perf_counter()
            peer_images[unit] = lucent_unit(peer_net, hook_name, unit, args.steps, args.size, mean, std, unit,
                                            args.rotate)
            seconds = time.perf_counter() - started
            peer_seconds += seconds
            print(f"  Lucent unit {unit}: {seconds:.2f} s", flush=True)

    run_peer(peer_units[:half])
    started = time.perf_counter()
    ours = feature_visualization(loaded, args.layer, units, steps=args.steps, size=args.size, lr=0.05,
                                 parameterization="fft", decorrelate=True, transforms=kind, seed=0)
    our_seconds = time.perf_counter() - started
    print(f"  ours, {len(units)} units: {our_seconds:.2f} s (folded copy: {ours.settings['batchnorm_folded']})",
          flush=True)
    run_peer(peer_units[half:])

    ours_per_unit = our_seconds / len(units)
    peer_per_unit = peer_seconds / len(peer_units)
    speed = peer_per_unit / ours_per_unit
    lucent_stack = torch.cat([peer_images[u] for u in peer_units])
    lucent_final = unit_objective(loaded, args.layer, lucent_stack, peer_units)
    ours_final = unit_objective(loaded, args.layer, ours.images[: len(peer_units)], peer_units)
    ratios = (ours_final / lucent_final).tolist()
    median = statistics.median(ratios)
    for unit, a, b in zip(peer_units, ours_final.tolist(), lucent_final.tolist(), strict=True):
        print(f"  unit {unit:3d}: final objective ours {a:8.3f}  Lucent {b:8.3f}  ratio {a / b:6.3f}")
    print(f"per unit: ours {ours_per_unit:.3f} s, Lucent {peer_per_unit:.3f} s -> x{speed:.1f} faster; "
          f"final objective ours / Lucent: median {median:.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    detail = (f"{args.layer}, {args.steps} steps, {args.size} px, {len(units)} units batched, "
              f"{'with' if args.rotate else 'no'} rotation")
    row(f"featurevis {args.layer}", "Lucent render loop, one unit at a time", speed, 5.0, detail=detail)
    row(f"featurevis {args.layer} objective", "Lucent final objective", median, 0.9, unit="x (ours / peer)",
        detail=f"median over {len(peer_units)} units, both scored by unit_objective")


if __name__ == "__main__":
    main()
