"""Feature visualisation by optimisation: the image a unit likes best, grown from noise.

Olah, Mordvintsev & Schubert, "Feature Visualization" (Distill 2017), and its library Lucid:
gradient ascent on an input image to maximise one unit's activation at a layer. Left alone,
the ascent finds high-frequency patterns the network responds to but a person cannot read; three
choices from the paper make the images legible, and all three are here:

- **A better parameterisation.** The image is not optimised pixel by pixel but as a Fourier
  spectrum whose coefficients are scaled by ``1 / frequency`` (``"fft"``): a step of the same
  size changes low frequencies far more than high ones, which whitens the gradient. Its colours
  go through the square root of ImageNet's colour covariance (``decorrelate``), then a sigmoid
  to ``[0, 1]``. The pixels then go through the model's own normalisation (its preprocess mean
  and std) before the network, as a photo would.
- **Transformation robustness.** Before each step the image is padded, jittered, scaled and
  rotated a little (``"standard"``, Lucid's ``standard_transforms``): a pattern that survives
  small shifts is a feature, a pattern that does not is an adversarial accident.
- **Diversity.** A unit often responds to several things; ``objective="diversity"`` grows
  several images per unit and penalises the cosine similarity of their Gram matrices (style
  statistics) at the layer, so they show different facets.

**Batched over units.** One optimisation holds one image per unit, row ``i`` maximising its own
unit's objective; the loss is the sum of the rows' objectives, so each row's gradient is the
one it would get alone, and Adam works element by element: a batched run equals one-at-a-time
runs. Randomness keeps that promise: every image draws its start and its transforms from its
own ``torch.Generator`` seeded from ``(seed, unit, image within unit)``, never from a shared
stream. Only ``diversity`` couples rows, and only the rows of one unit, which always share a
chunk. oneDNN runs a one-image batch through other kernels than a larger batch (last-bit
differences, which Adam then grows), so a lone image goes through the network twice, as in
``dataset/patches._forward``.

**Speed.** Nothing after the layer runs: a hook raises a private exception once the layer's
output is captured. The network is the BatchNorm-folded inference copy (``probes/fold.py``,
parameters without gradients) when the layer's output is the same in it, else the caller's model
with its parameters' ``requires_grad`` switched off for the call and restored after. Inputs are
channels-last when the model's convolutions are.

Peer differences: Lucid's ``jitter`` is a random crop (the image shrinks by ``d - 1``), as here;
Lucent translates inside a fixed frame instead. Scaling and rotation are one affine resampling
per image (``grid_sample``) within a fixed frame whose outside repeats the border, which the
0.5-grey padding makes grey; Lucid resizes the whole batch by one shared factor and rotates with
zero fill. Lucent upsamples images smaller than 224 pixels to 224 before the network; here the
network sees the image at the size it is optimised at.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from convscope.errors import BadArgument, BadInputType, close_matches
from convscope.methods._common import ModelLike
from convscope.methods.gradcam import feature_map_of
from convscope.models.load import as_loaded
from convscope.probes.fold import Folded, fold_batchnorm
from convscope.probes.hooks import Capture, StopForward, capture, eval_mode, reduce_outputs
from convscope.probes.layers import MapLayer, map_layer
from convscope.probes.layout import network_memory_format
from convscope.types import LoadedModel

OBJECTIVES = ("channel", "neuron", "negative", "diversity")
PARAMETERIZATIONS = ("fft", "pixel")
# "no-rotation" is "standard" without the rotation: Lucent's rotation calls kornia functions that
# kornia 0.5 and later no longer have, so the comparison with it (bench/featurevis.py) can leave
# rotation out on both sides.
TRANSFORMS = ("standard", "no-rotation", "none")
MAX_STEPS = 10_000
MIN_SIZE, MAX_SIZE = 16, 1024
MAX_DIVERSITY = 32
MAX_UNITS = 1 << 16
MAX_LR = 10.0
# Lucid's tutorial (and Lucent's) maximise ``channel(layer, n) - 1e2 * diversity(layer)``; both
# average the channel term over the batch and divide the pairwise similarities by the batch size,
# so per image it is ``mean_i - w * sum_{j != i} cos(G_i, G_j)``, which is what is used. Their
# 1e2 was set for InceptionV1, whose input is 0-255 pixels minus 117 and whose activations are
# an order of magnitude larger than those of a network on normalised input. On EfficientNet-Lite0
# (stage4, stage6; 64 steps, 4 images per unit) 1e2 drowns the unit: the diverse images reach
# 10-50% of the channel mean a single image reaches. At 10 they keep 65-95% of it and still
# differ visibly, so 10 it is.
DIVERSITY_WEIGHT = 10.0
INIT_SD = 0.01  # Lucid's standard deviation of the starting spectrum or pixels
FFT_DIVISOR = 4.0  # Lucid divides the inverse FFT by 4 (less saturated first images)
PAD = 12
PAD_VALUE = 0.5
JITTER_FIRST, JITTER_LAST = 8, 4
SCALES = tuple(1 + (i - 5) / 50 for i in range(11))
ANGLES = tuple(range(-10, 11)) + (0,) * 5  # degrees; the extra zeros as in Lucid
# Lucid's square root of ImageNet's colour covariance (from its SVD), columns scaled so the
# largest has norm 1: a unit step in the decorrelated space moves the colours as natural
# images vary.
_COLOUR_SQRT = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))

Progress = Callable[[int], None]


@dataclass(frozen=True)
class FeatureVisualization:
    """Images that maximise units of one layer.

    Attributes:
        images: ``(N, C, H, W)`` float32 in ``[0, 1]`` on the CPU: the pixels before the model's
            normalisation (``C`` is 3, or the model's channel count for a grayscale model).
        layer: the layer name as given.
        units: ``N`` channel ids, one per image; with ``objective="diversity"`` each unit's
            ``images_per_unit`` images are consecutive.
        objective: ``"channel"``, ``"neuron"``, ``"negative"`` or ``"diversity"``.
        curves: ``(N, steps)`` float32: each image's objective at each step, on the transformed
            image the step saw, before the step's update. Higher is better for every objective:
            ``negative`` reports minus the channel mean (the value maximised), ``diversity``
            the channel mean minus ``DIVERSITY_WEIGHT`` times the summed cosine similarity of
            the image's Gram matrix with those of its unit's other images.
        final: ``(N,)`` float32: the objective of each final image, without transforms.
        images_per_unit: 1, or ``diversity`` for the diversity objective.
        settings: the resolved options (JSON-ready): objective, steps, size, parameterization,
            decorrelate, transforms, lr, seed, batch_size, diversity, diversity_weight, the
            layer's module path and layout, the normalisation, and whether the folded copy ran.
    """

    images: torch.Tensor
    layer: str
    units: tuple[int, ...]
    objective: str
    curves: torch.Tensor
    final: torch.Tensor
    images_per_unit: int
    settings: dict[str, Any]


def feature_visualization(
    model: ModelLike,
    layer: str,
    channels: int | Sequence[int],
    *,
    objective: str = "channel",
    steps: int = 512,
    size: int | None = None,
    parameterization: str = "fft",
    decorrelate: bool = True,
    transforms: str = "standard",
    lr: float = 0.05,
    seed: int = 0,
    batch_size: int | None = None,
    progress: Progress | None = None,
    diversity: int = 4,
) -> FeatureVisualization:
    """Optimise one image per unit (``diversity`` per unit for that objective), all units at once.

    Args:
        model: a ``LoadedModel`` or any ``nn.Module`` (ImageNet normalisation then).
        layer: alias or module path of a feature map (NCHW, NHWC or tokens on a grid).
        channels: one channel id or several, in the order the images come back.
        objective: ``"channel"`` (mean of the unit's map), ``"neuron"`` (its centre cell),
            ``"negative"`` (minimise the channel mean) or ``"diversity"`` (channel minus the
            Gram-similarity penalty between the unit's images; see ``DIVERSITY_WEIGHT``).
        steps: Adam steps.
        size: side of the square image (default: the model's input size).
        parameterization: ``"fft"`` (1/frequency-scaled spectrum, Lucid's) or ``"pixel"``.
        decorrelate: colours through ImageNet's colour-correlation square root (3-channel models).
        transforms: ``"standard"`` (pad 12, jitter 8, scale, rotate, jitter 4), ``"no-rotation"``
            (the same without the rotation) or ``"none"``.
        lr: Adam's learning rate.
        seed: the start and the transforms of each image come from a generator seeded with
            ``(seed, unit, image within unit)``: the same seed gives the same images whatever
            the batching.
        batch_size: units per optimisation (``None``: all at once).
        progress: called with 1 after every step of every chunk (``steps`` times the number of
            chunks in all).
        diversity: images per unit with ``objective="diversity"`` (ignored otherwise).

    Returns:
        the ``FeatureVisualization``.

    Raises:
        BadArgument: an option out of range or unknown, a channel id out of range for the layer.
        BadInputType: an option of the wrong kind.
        UnknownLayer: no such layer, or not a feature map.
    """
    options = _Options.checked(objective, steps, size, parameterization, decorrelate, transforms, lr, seed,
                               batch_size, diversity)
    ids = _channel_ids(channels)
    loaded = as_loaded(model)
    side = options.size or int(loaded.preprocess.crop)
    colours = int(loaded.preprocess.channels)
    target = map_layer(loaded, layer, (colours, side, side))
    per_unit = options.diversity if options.objective == "diversity" else 1
    units = tuple(u for u in ids for _ in range(per_unit))
    chunk_units = options.batch_size or len(ids)

    with _network(loaded, target, (colours, side, side)) as network:
        count = network.channels
        for unit in ids:
            if not unit < count:
                raise BadArgument(f"--channels {unit}",
                                  f"is out of range: layer {layer} has {count} channels (0..{count - 1})")
        image_f = _Parameterization(options, colours, side, loaded)
        images, curves, finals = [], [], []
        for start in range(0, len(ids), chunk_units):
            chunk = ids[start : start + chunk_units]
            rows = tuple(u for u in chunk for _ in range(per_unit))
            seeds = [_image_seed(options.seed, u, j) for u in chunk for j in range(per_unit)]
            final_images, curve = _optimise(network, image_f, options, rows, seeds, per_unit, progress)
            with torch.no_grad():
                finals.append(_objective(network.layer_map(network.normalise(final_images)), rows, options,
                                         per_unit).float().cpu())
            images.append(final_images.detach().float().cpu())
            curves.append(curve)
        folded = network.folded

    settings = {
        "objective": options.objective, "steps": options.steps, "size": side,
        "parameterization": options.parameterization, "decorrelate": options.decorrelate and colours == 3,
        "transforms": options.transforms, "lr": options.lr, "seed": options.seed,
        "batch_size": options.batch_size, "diversity": per_unit if options.objective == "diversity" else None,
        "diversity_weight": DIVERSITY_WEIGHT if options.objective == "diversity" else None,
        "module": target.path, **target.layout.record(),
        "normalisation": {"mean": list(loaded.preprocess.mean), "std": list(loaded.preprocess.std)},
        "batchnorm_folded": folded,
    }
    return FeatureVisualization(
        images=torch.cat(images), layer=layer, units=units, objective=options.objective,
        curves=torch.cat(curves), final=torch.cat(finals), images_per_unit=per_unit, settings=settings,
    )


def unit_objective(
    model: ModelLike, layer: str, images: torch.Tensor, units: Sequence[int], *, objective: str = "channel",
    images_per_unit: int = 1,
) -> torch.Tensor:
    """The objective of given images, without transforms: what ``FeatureVisualization.final`` holds.

    Args:
        images: ``(N, C, H, W)`` pixels in ``[0, 1]`` (before the model's normalisation).
        units: one channel id per image.
        objective: as in ``feature_visualization``.
        images_per_unit: for ``diversity``: how many consecutive images share a unit.

    Returns:
        ``(N,)`` float32 on the CPU.
    """
    options = _Options.checked(objective, 1, None, "pixel", False, "none", 1.0, 0, None,
                               max(2, images_per_unit))
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise BadInputType("images", "expected an (N, C, H, W) tensor of pixels in [0, 1]")
    if len(units) != images.shape[0]:
        raise BadArgument("units", f"one per image: {len(units)} for {images.shape[0]} images")
    _whole("images_per_unit", images_per_unit, 1, MAX_DIVERSITY)
    if images.shape[0] % images_per_unit:
        raise BadArgument(f"images_per_unit {images_per_unit}", f"does not divide the {images.shape[0]} images")
    loaded = as_loaded(model)
    shape = tuple(int(n) for n in images.shape[1:])
    target = map_layer(loaded, layer, shape)
    with _network(loaded, target, shape) as network, torch.no_grad():
        count = network.channels
        for unit in units:
            if not 0 <= int(unit) < count:
                raise BadArgument(f"--channels {unit}",
                                  f"is out of range: layer {layer} has {count} channels (0..{count - 1})")
        pixels = images.to(device=loaded.device, dtype=torch.float32)
        acts = network.layer_map(network.normalise(pixels))
        return _objective(acts, tuple(int(u) for u in units), options, images_per_unit).float().cpu()


# ---------------------------------------------------------------- options


def check_options(
    *, objective: str = "channel", steps: int = 512, size: int | None = None, parameterization: str = "fft",
    decorrelate: bool = True, transforms: str = "standard", lr: float = 0.05, seed: int = 0,
    batch_size: int | None = None, diversity: int = 4,
) -> None:
    """Refuse options ``feature_visualization`` cannot work with, before any model is loaded.

    Raises:
        BadArgument, BadInputType: one line naming the first bad option.
    """
    _Options.checked(objective, steps, size, parameterization, decorrelate, transforms, lr, seed, batch_size,
                     diversity)


@dataclass(frozen=True)
class _Options:
    objective: str
    steps: int
    size: int | None
    parameterization: str
    decorrelate: bool
    transforms: str
    lr: float
    seed: int
    batch_size: int | None
    diversity: int

    @classmethod
    def checked(cls, objective: str, steps: int, size: int | None, parameterization: str, decorrelate: bool,
                transforms: str, lr: float, seed: int, batch_size: int | None, diversity: int) -> _Options:
        """Every option checked before the model is touched (one line naming the first bad one)."""
        _choice("--objective", objective, OBJECTIVES)
        _choice("--parameterization", parameterization, PARAMETERIZATIONS)
        _choice("--transforms", transforms, TRANSFORMS)
        _whole("--steps", steps, 1, MAX_STEPS)
        if size is not None:
            _whole("--size", size, MIN_SIZE, MAX_SIZE)
        if not isinstance(decorrelate, bool):
            raise BadInputType("decorrelate", f"must be True or False, not {decorrelate!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)):
            raise BadInputType("--lr", f"must be a number, not {type(lr).__name__}")
        if not (math.isfinite(lr) and 0 < lr <= MAX_LR):
            raise BadArgument(f"--lr {lr}", f"must be a finite number above 0 and at most {MAX_LR:g}")
        _whole("--seed", seed, 0, 2**63 - 1)
        if batch_size is not None:
            _whole("--batch-size", batch_size, 1, None)
        if objective == "diversity":
            _whole("--diversity", diversity, 2, MAX_DIVERSITY)
        return cls(objective, int(steps), None if size is None else int(size), parameterization, decorrelate,
                   transforms, float(lr), int(seed), None if batch_size is None else int(batch_size),
                   int(diversity) if objective == "diversity" else 1)


def _choice(subject: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        raise BadInputType(subject, f"must be one of {', '.join(choices)}, not {type(value).__name__}")
    if value not in choices:
        raise BadArgument(f"{subject} {value}", f"must be one of {', '.join(choices)}",
                          close_matches(value, choices))


def _whole(subject: str, value: object, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise BadInputType(subject, f"must be a whole number, not {type(value).__name__}")
    number = int(value)
    if number < low or (high is not None and number > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise BadArgument(f"{subject} {value}", f"must be {bounds}")


def _channel_ids(channels: int | Sequence[int]) -> tuple[int, ...]:
    """``channels`` as a tuple of ids >= 0, each once (the range is checked against the layer later)."""
    if isinstance(channels, torch.Tensor):
        channels = channels.tolist()
    if isinstance(channels, Integral) and not isinstance(channels, bool):
        channels = [int(channels)]
    if isinstance(channels, (str, bytes, bool)) or not isinstance(channels, Iterable):
        raise BadInputType("channels", f"expected a channel id or a sequence of them, not {type(channels).__name__}")
    ids: dict[int, None] = {}
    for item in channels:  # one by one: a huge range fails at the cap, not after filling the memory
        if isinstance(item, bool) or not isinstance(item, Integral):
            raise BadInputType("channels", f"channel ids are whole numbers, not {type(item).__name__}")
        if item < 0:
            raise BadArgument(f"--channels {item}", "is out of range: channel ids start at 0")
        if int(item) in ids:
            raise BadArgument(f"--channels {item}", "is given twice")
        if len(ids) >= MAX_UNITS:
            raise BadArgument("--channels", f"names more than {MAX_UNITS} channels")
        ids[int(item)] = None
    if not ids:
        raise BadArgument("--channels", "names no channels")
    return tuple(ids)


def _image_seed(seed: int, unit: int, index: int) -> int:
    """The generator seed of one image: a hash of ``(seed, unit, index)``, so neighbouring seeds
    and units give unrelated streams, and an image's stream does not depend on the batch."""
    digest = hashlib.blake2b(struct.pack("<QQQ", seed, unit, index), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


# ---------------------------------------------------------------- the network, stopped at the layer


class _Network:
    """The model as the optimisation runs it (made by ``_network``, valid inside its block): the
    network (the folded copy or the caller's model), the captured layer, and the normalisation.
    """

    def __init__(self, net: nn.Module, target: MapLayer, store: Capture[torch.Tensor], loaded: LoadedModel,
                 colours: int, folded: bool) -> None:
        self.net = net
        self.target = target
        self.store = store
        self.folded = folded
        self.dtype = loaded.dtype
        shape = (1, colours, 1, 1)
        self.mean = torch.tensor(loaded.preprocess.mean, dtype=torch.float32, device=loaded.device).view(shape)
        self.std = torch.tensor(loaded.preprocess.std, dtype=torch.float32, device=loaded.device).view(shape)
        # Channels-last input when the model's convolutions are (load_model sets it per model).
        self.channels_last = network_memory_format(net) == torch.channels_last
        self.calls = 0  # the layer's calls in one forward (0: not counted yet, run to the end)
        self.channels = 0
        self.seen = 0
        # A network that takes only its own input size (ViT, Swin: fixed patch grids) gets each
        # transformed image resampled back to the optimised size (Lucent resizes to 224 likewise).
        self.fixed_size: tuple[int, int] | None = None

    def stopper(self, name: str, output: torch.Tensor) -> None:
        """The second hook on the layer: stops the forward once its last call is captured."""
        self.seen += 1
        if self.calls and self.seen >= self.calls:
            raise StopForward  # nothing after the layer runs

    def run(self, x: torch.Tensor) -> None:
        self.store.clear()
        self.seen = 0
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            self.net(x)
        except StopForward:
            pass

    def last(self) -> torch.Tensor:
        return feature_map_of(self.store, self.target.name, self.target.name)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[0, 1]`` pixels -> the network's input (the model's mean and std)."""
        return ((pixels - self.mean) / self.std).to(self.dtype)

    def layer_map(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's ``(N, C, h, w)`` map for the input batch ``x``, in the autograd graph."""
        count = x.shape[0]
        # A lone image goes in twice: oneDNN's one-image kernels differ in the last bits from the
        # same image in a larger batch (``dataset/patches._forward``); only the first copy is read.
        self.run(torch.cat([x, x]) if count == 1 else x)
        return self.last()[:count].float()


@contextmanager
def _network(loaded: LoadedModel, target: MapLayer, shape: tuple[int, ...]) -> Iterator[_Network]:
    """The model prepared for the optimisation, everything undone when the block ends.

    Inside the block: eval mode, parameters without gradients (the folded copy has none; on the
    caller's model the flags are switched off and restored), a capture of the layer's
    ``(N, C, h, w)`` view in the graph, and a second hook that stops the forward pass at the
    layer's last call (a module called twice per forward, such as a reused ReLU, is read at its
    last call, as every other method reads it).
    """
    original = loaded.module
    with ExitStack() as stack:
        stack.enter_context(eval_mode(original))
        folded = _folded(loaded)
        use_copy = folded is not None and folded.module is not original and not folded.changes(target.path)
        net = folded.module if folded is not None and use_copy else original
        if not use_copy:
            stack.enter_context(_no_parameter_grads(net))
        layers = {target.name: net.get_submodule(target.path)}
        store = stack.enter_context(capture(net, layers, mode="graph", layouts={target.name: target.layout}))
        network = _Network(net, target, store, loaded, shape[0], use_copy)
        stack.enter_context(reduce_outputs(net, layers, network.stopper))
        with torch.no_grad():  # count the layer's calls and channels once
            try:
                network.run(torch.zeros((2, *shape), device=loaded.device, dtype=loaded.dtype))
            except Exception:
                # The layers after ours may not take this size (a classifier sized for the
                # model's own input); they never run during the optimisation, so only a
                # failure before our layer's first call is the user's problem.
                if not network.seen:
                    raise
            network.calls = max(1, network.seen)
            network.channels = int(network.last().shape[1])
            grown = shape[-1] + 2 * PAD - (JITTER_FIRST - 1) - (JITTER_LAST - 1)  # what the transforms give
            try:
                network.run(torch.zeros((2, shape[0], grown, grown), device=loaded.device, dtype=loaded.dtype))
            except Exception:  # noqa: BLE001  (any refusal before the layer: the network wants its own size)
                network.fixed_size = (shape[-2], shape[-1])
        yield network


def _folded(loaded: LoadedModel) -> Folded | None:
    """The BatchNorm-folded copy, traced at the model's own input size (a whole forward runs
    there, while the optimised image may be a size only the layers before ours can take)."""
    example = torch.zeros((1, *loaded.preprocess.input_size), device=loaded.device, dtype=loaded.dtype)
    try:
        return fold_batchnorm(loaded.module, example)
    except (RuntimeError, ValueError):  # a wrapped model whose forward fails at its preset size
        return None  # the copy is only a speed-up: run the model itself


@contextmanager
def _no_parameter_grads(module: nn.Module) -> Iterator[None]:
    """Parameters without gradients for the block (the image alone is optimised), restored after."""
    flags = [(parameter, parameter.requires_grad) for parameter in module.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


# ---------------------------------------------------------------- parameterisation


class _Parameterization:
    """The optimised tensor of each image and the map from it to ``[0, 1]`` pixels."""

    def __init__(self, options: _Options, colours: int, side: int, loaded: LoadedModel) -> None:
        self.fft = options.parameterization == "fft"
        self.colours = colours
        self.side = side
        self.device = loaded.device
        self.decorrelate = options.decorrelate and colours == 3
        matrix = torch.tensor(_COLOUR_SQRT, dtype=torch.float32)
        self.colour = (matrix / matrix.norm(dim=0).max()).to(self.device)
        if self.fft:
            fy = torch.fft.fftfreq(side, dtype=torch.float64)[:, None]
            fx = torch.fft.rfftfreq(side, dtype=torch.float64)[None, :]
            frequency = torch.sqrt(fx * fx + fy * fy)
            # 1 / frequency, with the zero frequency at the lowest non-zero one (Lucid's decay 1).
            self.scale = (1.0 / frequency.clamp(min=1.0 / side)).float().to(self.device)[None, None, :, :, None]
            self.shape: tuple[int, ...] = (colours, side, side // 2 + 1, 2)
        else:
            self.shape = (colours, side, side)

    def initial(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """One starting tensor per image, each from its own generator (on the CPU, then moved)."""
        rows = [torch.randn(self.shape, generator=g, dtype=torch.float32) * INIT_SD for g in generators]
        return torch.stack(rows).to(self.device)

    def pixels(self, parameter: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` in ``[0, 1]``."""
        if self.fft:
            spectrum = torch.view_as_complex((parameter * self.scale).contiguous())
            image = torch.fft.irfft2(spectrum, s=(self.side, self.side), norm="ortho") / FFT_DIVISOR
        else:
            image = parameter
        if self.decorrelate:
            image = torch.einsum("nkhw,ck->nchw", image, self.colour)
        return torch.sigmoid(image)


# ---------------------------------------------------------------- transforms


@dataclass(frozen=True)
class _Draws:
    """Each image's random choices for every step: ``(N, steps)`` integer tables."""

    first: torch.Tensor  # (N, steps, 2): jitter 8 offsets (rows, columns)
    scale: torch.Tensor  # (N, steps): index into SCALES
    angle: torch.Tensor  # (N, steps): index into ANGLES
    last: torch.Tensor  # (N, steps, 2): jitter 4 offsets

    @classmethod
    def drawn(cls, generators: Sequence[torch.Generator], steps: int) -> _Draws:
        first, scale, angle, last = [], [], [], []
        for g in generators:
            first.append(torch.randint(0, JITTER_FIRST, (steps, 2), generator=g))
            scale.append(torch.randint(0, len(SCALES), (steps,), generator=g))
            angle.append(torch.randint(0, len(ANGLES), (steps,), generator=g))
            last.append(torch.randint(0, JITTER_LAST, (steps, 2), generator=g))
        return cls(torch.stack(first), torch.stack(scale), torch.stack(angle), torch.stack(last))


def _transform(images: torch.Tensor, draws: _Draws, step: int, kind: str,
               out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Lucid's robustness transforms of each image, as one resampling.

    Pad by 12 (grey), crop 7 pixels off at the image's own offset (jitter 8), zoom and turn about
    the frame's centre, crop 3 more off (jitter 4): every stage maps output pixels to input
    pixels affinely, so their composition is one affine map per image and one ``grid_sample``
    does it all. Done stage by stage, each crop's backward wrote a zero tensor of the whole batch
    per image; here the network's input is ``(N, C, H + 14, W + 14)`` in one pass, and the
    outside of the image reads 0.5 (grey, the padding) through ``zeros`` padding around
    ``images - 0.5``.
    """
    if kind == "none":
        return images
    count, channels, height, width = images.shape
    scales = torch.tensor(SCALES, dtype=torch.float64)[draws.scale[:, step]]
    angles = torch.tensor(ANGLES, dtype=torch.float64)[draws.angle[:, step]]
    if kind == "no-rotation":
        angles = torch.zeros_like(angles)
    theta = _transform_matrices((height, width), draws.first[:, step], scales, angles, draws.last[:, step])
    out_height = height + 2 * PAD - (JITTER_FIRST - 1) - (JITTER_LAST - 1)
    out_width = width + 2 * PAD - (JITTER_FIRST - 1) - (JITTER_LAST - 1)
    if out_size is not None:  # the same region, sampled at the size the network takes
        out_height, out_width = out_size
    grid = F.affine_grid(theta.to(images.device, images.dtype), [count, channels, out_height, out_width],
                         align_corners=False)
    centred = images - PAD_VALUE
    return F.grid_sample(centred, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + PAD_VALUE


def _transform_matrices(size: tuple[int, int], first: torch.Tensor, scales: torch.Tensor, angles: torch.Tensor,
                        last: torch.Tensor) -> torch.Tensor:
    """``(N, 2, 3)`` ``affine_grid`` matrices: the output's normalised coordinates -> the image's.

    In pixels (``x + 0.5`` at the centre of column ``x``), output point ``p`` reads the image at
    ``c + R (p + d2 - c) + d1 - PAD``: ``d1``, ``d2`` the two crop offsets, ``c`` the centre of
    the frame after the first crop, ``R`` the inverse zoom and turn. Offsets come as ``(row,
    column)``.
    """
    height, width = size
    count = first.shape[0]
    frame_h, frame_w = height + 2 * PAD - (JITTER_FIRST - 1), width + 2 * PAD - (JITTER_FIRST - 1)
    out_h, out_w = frame_h - (JITTER_LAST - 1), frame_w - (JITTER_LAST - 1)
    radians = angles * (math.pi / 180.0)
    cos, sin = torch.cos(radians) / scales, torch.sin(radians) / scales
    turn = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # (N, 2, 2), (x, y)
    centre = torch.tensor([frame_w / 2, frame_h / 2], dtype=torch.float64)
    d1, d2 = first.flip(1).to(torch.float64), last.flip(1).to(torch.float64)  # (column, row) = (x, y)
    shift = centre + torch.einsum("nij,nj->ni", turn, d2 - centre) + d1 - PAD
    pixels = torch.zeros((count, 3, 3), dtype=torch.float64)
    pixels[:, :2, :2], pixels[:, :2, 2], pixels[:, 2, 2] = turn, shift, 1.0
    from_output = torch.tensor([[out_w / 2, 0, out_w / 2], [0, out_h / 2, out_h / 2], [0, 0, 1]],
                               dtype=torch.float64)
    to_input = torch.tensor([[2 / width, 0, -1], [0, 2 / height, -1], [0, 0, 1]], dtype=torch.float64)
    return (to_input @ pixels @ from_output)[:, :2, :].to(torch.float32)


# ---------------------------------------------------------------- objectives and the loop


def _objective(acts: torch.Tensor, units: Sequence[int], options: _Options, per_unit: int) -> torch.Tensor:
    """Each row's objective (higher is better) from the layer's ``(N, C, h, w)`` map."""
    rows = torch.arange(acts.shape[0], device=acts.device)
    index = torch.tensor(units, device=acts.device)
    maps = acts[rows, index]  # (N, h, w): each row's own unit
    if options.objective == "neuron":
        return maps[:, maps.shape[1] // 2, maps.shape[2] // 2]
    mean = maps.mean(dim=(1, 2))
    if options.objective == "negative":
        return -mean
    if options.objective == "channel":
        return mean
    return mean - DIVERSITY_WEIGHT * _similarity(acts, per_unit)


def _similarity(acts: torch.Tensor, per_unit: int) -> torch.Tensor:
    """Per image, the summed cosine similarity of its Gram matrix with those of its unit's
    other images (Lucid's diversity term, per image)."""
    count, channels = acts.shape[:2]
    flat = acts.reshape(count, channels, -1)
    grams = F.normalize((flat @ flat.transpose(1, 2)).reshape(count, -1), dim=1)
    grams = grams.reshape(count // per_unit, per_unit, -1)
    cosines = grams @ grams.transpose(1, 2)  # (units, per_unit, per_unit)
    others = cosines.sum(-1) - torch.diagonal(cosines, dim1=1, dim2=2)
    return others.reshape(count)


class _Adam:
    """Adam (Kingma & Ba) on one tensor, as ``torch.optim.Adam`` computes it with its defaults.

    Written out because ``torch.optim`` imports ``torch._dynamo`` on the first step (about two
    seconds of a command's start-up); the update is element by element, so each row of a batch
    moves exactly as it would alone.
    """

    def __init__(self, parameter: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.parameter, self.lr, self.betas, self.eps = parameter, lr, betas, eps
        self.first = torch.zeros_like(parameter)
        self.second = torch.zeros_like(parameter)
        self.steps = 0

    @torch.no_grad()
    def step(self, gradient: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        self.steps += 1
        self.first.lerp_(gradient, 1 - beta1)
        self.second.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
        corrected = (self.second.sqrt() / math.sqrt(1 - beta2**self.steps)).add_(self.eps)
        self.parameter.addcdiv_(self.first, corrected, value=-self.lr / (1 - beta1**self.steps))


def _optimise(network: _Network, image_f: _Parameterization, options: _Options, units: tuple[int, ...],
              seeds: Sequence[int], per_unit: int, progress: Progress | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: Adam on all its images at once. Returns the final pixels and the curves."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    parameter = image_f.initial(generators).requires_grad_(True)
    draws = _Draws.drawn(generators, options.steps)
    optimiser = _Adam(parameter, options.lr)
    curve = torch.empty((len(units), options.steps), dtype=torch.float32, device=parameter.device)
    with torch.enable_grad():
        for step in range(options.steps):
            pixels = _transform(image_f.pixels(parameter), draws, step, options.transforms, network.fixed_size)
            value = _objective(network.layer_map(network.normalise(pixels)), units, options, per_unit)
            # The sum, not the mean: each row's gradient is the one it would get alone.
            (gradient,) = torch.autograd.grad(-value.sum(), parameter)
            optimiser.step(gradient)
            curve[:, step] = value.detach()
            if progress is not None:
                progress(1)
    with torch.no_grad():
        return image_f.pixels(parameter), curve.cpu()
