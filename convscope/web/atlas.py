"""The atlas a web server shows: ``atlas.json`` read once, checked, and looked up by layer and unit.

An atlas folder (``convscope atlas``, format in ``docs/atlas-format.md``) holds, per unit of some
layers, a feature visualisation, its negative, the top dataset patches with their projections and
statistics. The app serves its pictures, so the folder is a trust boundary of a small kind: the
document names every picture, and a picture is served only when it is one of those names, a
relative path that stays inside the folder once symlinks are resolved, a regular file and a PNG.
Paths that are absolute or climb out (``..``) make the document damaged (refused at load); a
symlink leading out is refused when the picture is asked for, since the files may change while
the server runs.

What else lives here is the glue between the atlas and the served model: which model and weights
``serve --atlas`` opens (``served_model``), and which of the atlas's units a photo excites most
(``photo_units``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convscope.errors import BadArgument, DataError, UnknownLayer, close_matches

FORMAT = "convscope-atlas"
VERSION = 1
INDEX = "atlas.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The URL vocabulary of a unit's pictures: ours, mapped onto whatever names the document records
# (the writer may number a name when a user's file already holds it, so names are never built).
# Per list of patches: the URL names of its two pictures (``<name>_<i>``, i the patch's position).
PATCH_PICTURES = {"patches": ("crop", "projection"), "relevance_patches": ("relevance_crop", "relevance_map")}
PICTURE_PATTERN = (r"^(featurevis|negative|(" + "|".join(n for pair in PATCH_PICTURES.values() for n in pair)
                   + r")_(0|[1-9][0-9]{0,5}))$")


@dataclass(frozen=True)
class AtlasLayer:
    """One layer of an atlas.

    Attributes:
        name: the layer as given to ``convscope atlas`` (an alias or a module path).
        record: its ``layers[]`` entry of ``atlas.json``, as read.
        units: unit id -> its ``units[]`` entry, in the document's order.
    """

    name: str
    record: Mapping[str, Any]
    units: Mapping[int, Mapping[str, Any]]


class Atlas:
    """A checked atlas folder: its document, its folder and lookups by layer and unit.

    Attributes:
        folder: the folder, resolved (symlinks followed).
        document: ``atlas.json`` as read (non-finite numbers read as ``None``).
        layers: layer name -> ``AtlasLayer``, in the document's order.
    """

    def __init__(self, folder: Path, document: dict[str, Any]) -> None:
        self.folder = folder
        self.document = document
        self.layers = _check_document(document, folder / INDEX)

    @property
    def model(self) -> str:
        return str(self.document["model"])

    def layer(self, name: str) -> AtlasLayer:
        """The layer ``name``.

        Raises:
            UnknownLayer: not a layer of the atlas (the message lists close names).
        """
        found = self.layers.get(name)
        if found is None:
            raise UnknownLayer(f"layer {name}", "is not a layer of the atlas", close_matches(name, list(self.layers)))
        return found

    def unit(self, layer: str, unit: int) -> Mapping[str, Any]:
        """The ``units[]`` entry of ``unit`` in ``layer``.

        Raises:
            UnknownLayer: an unknown layer.
            BadArgument: a unit the atlas does not hold for that layer.
        """
        found = self.layer(layer)
        record = found.units.get(unit)
        if record is None:
            raise BadArgument(f"unit {unit} of layer {layer}", "is not in the atlas",
                              "its units: " + _ranges(list(found.units)))
        return record

    def picture_names(self, layer: str, unit: int) -> dict[str, str]:
        """The URL names of a unit's pictures -> the paths the document records for them."""
        record = self.unit(layer, unit)
        names = {"featurevis": str(record["featurevis"]), "negative": str(record["negative"])}
        for kind, (crop, projection) in PATCH_PICTURES.items():
            for i, patch in enumerate(record.get(kind) or ()):
                names[f"{crop}_{i}"] = str(patch["crop"])
                names[f"{projection}_{i}"] = str(patch["projection"])
        return names

    def picture(self, layer: str, unit: int, name: str) -> Path:
        """The file of one picture of a unit, checked to be safe to serve.

        Raises:
            UnknownLayer, BadArgument: an unknown layer, unit or picture name.
            DataError: the picture is missing, is not a regular file or not a PNG, or resolves
                (through a symlink) to a place outside the atlas folder.
        """
        relative = self.picture_names(layer, unit).get(name)
        if relative is None:
            raise BadArgument(f"picture {name} of unit {unit} of layer {layer}", "is not in the atlas")
        return self.resolve(relative)

    def resolve(self, relative: str) -> Path:
        """A path the document names -> the file, inside the folder after symlinks are resolved.

        Raises:
            DataError: one line naming the path: unsafe, missing, not a file, outside, not a PNG.
        """
        subject = f"atlas picture {relative}"
        _check_relative(relative, subject)
        try:
            path = (self.folder / relative).resolve(strict=True)
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop on older Pythons
            raise DataError(subject, "is missing from the atlas folder") from None
        if not path.is_relative_to(self.folder):
            raise DataError(subject, "leads outside the atlas folder (a symlink?)")
        if not path.is_file():
            raise DataError(subject, "is not a regular file")
        try:
            with open(path, "rb") as handle:
                head = handle.read(len(PNG_SIGNATURE))
        except OSError as exc:
            raise DataError(subject, f"cannot be read ({exc.strerror or exc})") from None
        if head != PNG_SIGNATURE:
            raise DataError(subject, "is not a PNG file")
        return path


def load_atlas(folder: str | Path, *, subject: str = "--atlas") -> Atlas:
    """Read and check an atlas folder.

    Args:
        folder: the folder ``convscope atlas -o`` wrote.
        subject: how the folder is named in errors (the CLI's ``--atlas``).

    Raises:
        DataError: one line: no such folder, no ``atlas.json``, not JSON, another format or
            version, or a document that does not hold what the format promises.
    """
    given = Path(folder)
    if not given.is_dir():
        raise DataError(f"{subject} {given}", "is not a folder" if given.exists() else "does not exist",
                        "give the folder convscope atlas -o wrote")
    index = given / INDEX
    if not index.is_file():
        raise DataError(f"{subject} {given}", f"has no {INDEX}: it is not an atlas folder",
                        "give the folder convscope atlas -o wrote")
    try:
        text = index.read_text(encoding="utf-8")
        document = json.loads(text, parse_constant=lambda _: None)  # NaN, Infinity: not JSON
    except OSError as exc:
        raise DataError(str(index), f"cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise DataError(str(index), "is damaged: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DataError(str(index), f"is damaged: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(document, dict):
        raise DataError(str(index), "is damaged: not a JSON object")
    if document.get("format") != FORMAT:
        raise DataError(str(index), f"is not a convscope atlas (format {document.get('format')!r}, "
                        f"expected {FORMAT!r})")
    if document.get("version") != VERSION:
        raise DataError(str(index), f"is atlas format version {document.get('version')!r}; this convscope "
                        f"reads version {VERSION}", "upgrade convscope, or run convscope atlas again")
    return Atlas(given.resolve(), document)


# ---------------------------------------------------------------- the served model


@dataclass(frozen=True)
class ServedModel:
    """What ``serve --atlas`` opens: the model spec, the weights and the seed of random weights.

    Attributes:
        model: the atlas's model spec.
        weights: ``"pretrained"``, ``"random"``, a weights file, or ``None`` (the model's own).
        seed: the seed of random weights (the one the atlas recorded).
        note: a warning line for the CLI, or ``None``.
    """

    model: str
    weights: str | None
    seed: int
    note: str | None = None


_RANDOM = re.compile(r"^random \(seed (\d{1,19})\b")
_WEIGHT_FILES = (".pth", ".pt", ".safetensors", ".ckpt", ".bin")


def served_model(atlas: Atlas, model: str | None = None, weights: str | None = None) -> ServedModel:
    """The model, weights and seed a server of ``atlas`` must run, so its pictures fit the model.

    The model is the atlas's; ``model``, when given, must name the same one. The weights follow
    the atlas's record: ``pretrained (...)`` -> ``"pretrained"``; ``random (seed N...)`` ->
    ``"random"`` with seed N; a checkpoint or weights file -> that file (as recorded, else next to
    the atlas folder, else inside it); anything else (a factory's own, a ``.pt2``) -> ``None``.
    ``weights``, when given, wins, with a note when it differs from the record.

    Raises:
        BadArgument: ``model`` names another model; the recorded weights file is not found.
    """
    recorded = atlas.model
    if model is not None and _canonical(model) != _canonical(recorded):
        raise BadArgument(f"--model {model}", f"the atlas was computed with {recorded}",
                          "drop --model to serve the atlas's model")
    text = atlas.document.get("weights")
    text = text.strip() if isinstance(text, str) else ""
    seed = 0
    own: str | None = None
    matched = _RANDOM.match(text)
    if text.startswith("pretrained"):
        own = "pretrained"
    elif text == "random" or matched:
        own, seed = "random", int(matched.group(1)) if matched else 0
    elif text.lower().endswith(_WEIGHT_FILES):
        if weights is not None:  # given: the recorded file need not exist any more
            own = text
        else:
            own = str(_weights_file(atlas, text))
    if weights is None:
        return ServedModel(recorded, own, seed)
    note = None
    same = weights == own or (own not in (None, "pretrained", "random")
                              and _weights_path(atlas, str(own)) == Path(weights).resolve())
    if own is not None and not same:
        note = (f"--weights {weights}: the atlas was computed with {text}; its pictures may not match "
                "what this model computes")
    return ServedModel(recorded, weights, seed if weights == "random" else 0, note)


def _canonical(spec: str) -> str:
    from convscope.models.external import parse_model_spec

    request = parse_model_spec(spec)
    if request.kind != "builtin":
        return request.text
    from convscope.models.registry import get_spec

    try:
        return get_spec(request.target).name
    except Exception:  # noqa: BLE001 - an unknown name is reported when the model is opened
        return request.text


def _weights_path(atlas: Atlas, recorded: str) -> Path | None:
    """A recorded weights file where it is found: as recorded (absolute, or from here), next to
    the atlas folder, inside it; ``None`` when none exists."""
    path = Path(recorded)
    candidates = [path] if path.is_absolute() else [path, atlas.folder.parent / path, atlas.folder / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    return None


def _weights_file(atlas: Atlas, recorded: str) -> Path:
    found = _weights_path(atlas, recorded)
    if found is not None:
        return found
    raise BadArgument(f"{atlas.folder / INDEX}", f"its weights file {recorded} is not found",
                      "give it with --weights FILE")


# ---------------------------------------------------------------- units for a photo


@dataclass(frozen=True)
class PhotoUnit:
    """A unit of the atlas and how it answers one photo.

    Attributes:
        unit: the channel id.
        value: the channel's maximum over its map for this photo (raw, as the atlas ranks patches).
        picture: ``(H, W, 3)`` uint8, the rectified map bilinear-upsampled to the network input,
            min-max scaled, in jet over the photo as the network sees it.
    """

    unit: int
    value: float
    picture: np.ndarray


def photo_units(loaded: Any, batch: Any, layer: AtlasLayer, count: int) -> list[PhotoUnit]:
    """The ``count`` units of ``layer`` in the atlas that fire most on one photo, strongest first.

    Ranked by each channel's maximum over its feature map (ties: the lower unit), the score the
    atlas ranks its patches by, so ``value`` reads against the unit's ``stats.max``.

    Args:
        loaded: the served model (the atlas's).
        batch: ``(1, C, H, W)`` the photo, preprocessed for it.

    Raises:
        UnknownLayer: the layer does not resolve in the model, or is not a feature map.
        DataError: the model's layer has fewer channels than the atlas's units need, or another
            count than the atlas records (not the model the atlas was made with).
    """
    from convscope.methods.activations import strongest_units
    from convscope.render.overlay import overlay
    from convscope.render.pictures import display_image

    name = _model_layer(loaded, layer)
    recorded = layer.record.get("channels")
    hint = "serve the model the atlas was computed with"
    try:
        chosen, values, heat, total = strongest_units(loaded, batch, layer=name, units=sorted(layer.units),
                                                      count=count)
    except BadArgument as exc:  # a unit beyond the model's channels: not the atlas's model
        raise DataError(f"atlas layer {layer.name}", f"has units {loaded.name}'s {name} lacks ({exc.reason})",
                        hint) from None
    # The channel count tells whether this is the atlas's model.
    if recorded is not None and recorded != total:
        raise DataError(f"atlas layer {layer.name}", f"has {recorded} channels, {loaded.name}'s {name} has {total}",
                        hint)
    photo = display_image(loaded.preprocess, batch.cpu())
    return [PhotoUnit(int(chosen[i]), float(values[i]), overlay(photo, heat[i].numpy()))
            for i in range(len(chosen))]


def _model_layer(loaded: Any, layer: AtlasLayer) -> str:
    """The atlas layer's name in the model; its module path when the name (an alias) is unknown."""
    from convscope.probes.layers import resolve_layer

    try:
        resolve_layer(loaded, layer.name)
        return layer.name
    except UnknownLayer:
        path = layer.record.get("path")
        if isinstance(path, str) and path:
            try:
                resolve_layer(loaded, path)
                return path
            except UnknownLayer:
                pass
        raise UnknownLayer(f"layer {layer.name}", f"is not a layer of {loaded.name}",
                           "serve the model the atlas was computed with") from None


# ---------------------------------------------------------------- checking the document


def _check_document(document: dict[str, Any], index: Path) -> dict[str, AtlasLayer]:
    model = document.get("model")
    if not isinstance(model, str) or not model.strip():
        raise DataError(str(index), "is damaged: 'model' is not a model spec")
    layers = document.get("layers")
    if not isinstance(layers, list) or not layers:
        raise DataError(str(index), "is damaged: 'layers' is not a non-empty list")
    out: dict[str, AtlasLayer] = {}
    for i, record in enumerate(layers):
        where = f"{index} layers[{i}]"
        if not isinstance(record, dict):
            raise DataError(where, "is damaged: not an object")
        name = record.get("name")
        if not isinstance(name, str) or not name:
            raise DataError(where, "is damaged: 'name' is not a layer name")
        if name in out:
            raise DataError(where, f"is damaged: layer {name} appears twice")
        channels = record.get("channels")
        if channels is not None and (not _whole(channels) or channels < 1):
            raise DataError(where, "is damaged: 'channels' is not a positive whole number")
        units = record.get("units")
        if not isinstance(units, list) or not units:
            raise DataError(where, "is damaged: 'units' is not a non-empty list")
        checked: dict[int, Mapping[str, Any]] = {}
        for j, unit in enumerate(units):
            spot = f"{where}.units[{j}]"
            if not isinstance(unit, dict) or not _whole(unit.get("unit")) or unit["unit"] < 0:
                raise DataError(spot, "is damaged: not an object with a unit id")
            if unit["unit"] in checked:
                raise DataError(spot, f"is damaged: unit {unit['unit']} appears twice")
            if channels is not None and unit["unit"] >= channels:
                raise DataError(spot, f"is damaged: unit {unit['unit']} of a layer of {channels} channels")
            for field in ("featurevis", "negative"):
                _check_relative(unit.get(field), f"{spot}.{field}")
            if unit.get("stats") is not None and not isinstance(unit["stats"], dict):
                raise DataError(spot, "is damaged: 'stats' is not an object")
            for kind in ("patches", "relevance_patches"):
                patches = unit.get(kind)
                if patches is None and kind == "relevance_patches":  # none when relevance did not run
                    continue
                if not isinstance(patches, list):
                    raise DataError(f"{spot}.{kind}", "is damaged: not a list")
                for k, patch in enumerate(patches):
                    if not isinstance(patch, dict):
                        raise DataError(f"{spot}.{kind}[{k}]", "is damaged: not an object")
                    for field in ("crop", "projection"):
                        _check_relative(patch.get(field), f"{spot}.{kind}[{k}].{field}")
            checked[int(unit["unit"])] = unit
        out[name] = AtlasLayer(name, record, checked)
    return out


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_relative(value: Any, subject: str) -> None:
    """A path of the document: relative, ``/``-separated, without ``.``/``..`` or empty parts."""
    if not isinstance(value, str) or not value:
        raise DataError(subject, "is damaged: not a path")
    parts = value.split("/")
    unsafe = (value.startswith("/") or "\\" in value or "\0" in value or re.match(r"^[A-Za-z]:", value)
              or any(part in ("", ".", "..") for part in parts))
    if unsafe:
        raise DataError(subject, f"path {value!r} is not a plain relative path inside the atlas folder")


def _ranges(values: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5``."""
    spans: list[str] = []
    for start, end in _runs(sorted(values)):
        spans.append(str(start) if start == end else f"{start}-{end}")
    return ", ".join(spans[:20]) + (", ..." if len(spans) > 20 else "")


def _runs(values: Sequence[int]) -> Iterator[tuple[int, int]]:
    if not values:
        return
    start = previous = values[0]
    for value in values[1:]:
        if value != previous + 1:
            yield start, previous
            start = value
        previous = value
    yield start, previous
