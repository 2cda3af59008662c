"""``convscope train``, ``evaluate`` and ``ablate``: thin commands over ``convscope.training``."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from convscope.cli.options import SEED_MAX, DeviceOpt, JsonOpt, ModelOpt
from convscope.cli.output import OutputDir, prepare_folder
from convscope.cli.progress import show_progress
from convscope.errors import BadArgument
from convscope.parsing import parse_int, shown

DataOpt = Annotated[
    str | None,
    typer.Option("--data", "-d", help="fashion-mnist, digits, or a folder with one sub-folder of images per class."),
]
ArchOpt = Annotated[
    str | None,
    typer.Option("--arch", "-a", "--model", "-m", help="Architecture to train (see 'convscope models'), e.g. zfnet_mnist."),
]
RunDirOpt = Annotated[
    Path, typer.Option("--output", "-o", readable=False, help="Run folder (created): checkpoints, metrics, pictures.")
]
EpochsOpt = Annotated[int | None, typer.Option("--epochs", "-e", min=1, help="Passes over the training data (default: 10).")]
TrainEpochsOpt = Annotated[
    int | None,
    typer.Option("--epochs", "-e", min=1, help="Passes over the training data (default: 10); with --resume: extend to N."),
]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", "-b", min=2, help="Images per step; under torchrun the global batch over all processes (default: 128).")]
LrOpt = Annotated[
    float | None, typer.Option("--lr", help="Peak learning rate (default: adamw 3e-3, adam 1e-3, sgd 0.05).")
]
OptimizerOpt = Annotated[str | None, typer.Option("--optimizer", help="adamw, adam or sgd (default: adamw).")]
AugmentOpt = Annotated[
    str | None, typer.Option("--augment", help="Comma-separated: crop, flip, color, erase (default: none).")
]
SeedOpt = Annotated[
    int | None,
    typer.Option("--seed", min=0, max=SEED_MAX, help="Seed of init, data order, augmentation, dropout (default: 0)."),
]
ValSplitOpt = Annotated[
    float | None,
    typer.Option(
        "--val-split",
        help="Fraction of training images held out to pick best.pt (default: 0.1 for fashion-mnist/digits, 0.2 for "
        "folders without val/; 0: keep the last epoch). The test split never picks best.pt.",
    )
]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="Cap every split at N images (quick runs).")]
PrecisionOpt = Annotated[
    str | None, typer.Option("--precision", help="fp32, or bf16 autocast (fast on CPUs with AMX/AVX512-BF16) (default: fp32).")
]


def _epoch_list(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(parse_int(p, subject="epoch", minimum=0) for p in text.split(",") if p.strip())
    except BadArgument as exc:
        raise BadArgument(
            f"--snapshot-epochs {shown(text)}", f"{exc.reason}: expected comma-separated epoch numbers, e.g. 1,2,5"
        ) from None


# The library's errors name options as its parameters (``epochs 0``); this CLI says its flags. A
# parameter's flag is its name in kebab case (``batch_size`` -> ``--batch-size``) but for these.
_FLAGS = {"init_from": "--from", "out_dir": "--output"}


def _flag(parameter: str) -> str:
    return _FLAGS.get(parameter, "--" + parameter.replace("_", "-"))


@contextmanager
def _cli_wording(flags: dict[str, str] | None = None) -> Iterator[None]:
    """Re-word the training library's errors with this CLI's flags (``convscope.training.wording``).

    Args:
        flags: parameter -> flag where this command line differs from ``_FLAGS`` (``init_from``
            given as ``--weights``).
    """
    from convscope.errors import ConvscopeError
    from convscope.training.wording import worded

    chosen = _FLAGS if flags is None else flags
    try:
        yield
    except ConvscopeError as exc:
        again = worded(exc, lambda name: chosen.get(name) or _flag(name))
        if again is exc:
            raise
        raise again from exc


@contextmanager
def _train_display(label: str = "") -> Iterator[Callable[[Any], None]]:
    """Progress callback: a tqdm bar per epoch on a TTY; one line per finished epoch always (stderr)."""
    state: dict[str, Any] = {"bar": None}
    tty = show_progress()

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].close()
            state["bar"] = None

    def callback(event: Any) -> None:
        prefix = f"[{label}] " if label else ""
        if event.phase == "train" and tty:
            if state["bar"] is None:
                from tqdm import tqdm

                state["bar"] = tqdm(
                    total=event.steps, desc=f"{prefix}epoch {event.epoch}/{event.epochs}", unit="step",
                    file=sys.stderr, leave=False, dynamic_ncols=True,
                )
            bar = state["bar"]
            bar.update(event.step - bar.n)
            if event.step % 10 == 0 or event.step == event.steps:
                bar.set_postfix(loss=f"{event.loss:.4f}", acc=f"{event.accuracy:.4f}", refresh=False)
        elif event.phase == "load" and tty:
            if state["bar"] is None:
                from tqdm import tqdm

                state["bar"] = tqdm(total=event.steps, desc=f"{prefix}loading images", unit="img",
                                    file=sys.stderr, leave=False, dynamic_ncols=True)
            state["bar"].update(event.step - state["bar"].n)
            if event.step == event.steps:
                close()
        elif event.phase == "epoch":
            close()
            typer.echo(prefix + _epoch_line(event.metrics, event.epochs), err=True)
        elif event.phase in ("eval", "snapshot"):
            close()

    try:
        yield callback
    finally:
        close()


def _epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {metrics['epoch']}/{epochs}", f"loss {metrics['train_loss']:.4f}", f"train acc {metrics['train_accuracy']:.4f}"]
    for split in ("val", "test"):
        if f"{split}_accuracy" in metrics:
            parts.append(f"{split} acc {metrics[f'{split}_accuracy']:.4f}")
    if metrics.get("images_per_second"):
        parts.append(f"{metrics['images_per_second']:.0f} img/s")
    return "  ".join(parts)


def train_command(
    output: RunDirOpt,
    data: DataOpt = None,
    arch: ArchOpt = None,
    epochs: TrainEpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    optimizer: OptimizerOpt = None,
    weight_decay: Annotated[
        float | None, typer.Option("--weight-decay", help="Default: adamw 0.05, adam 0, sgd 5e-4.")
    ] = None,
    schedule: Annotated[
        str | None, typer.Option("--schedule", help="onecycle (warm-up then cosine), cosine or constant (default: onecycle).")
    ] = None,
    label_smoothing: Annotated[float | None, typer.Option("--label-smoothing", help="Default: 0.")] = None,
    augment: AugmentOpt = None,
    seed: SeedOpt = None,
    val_split: ValSplitOpt = None,
    limit: LimitOpt = None,
    snapshot_epochs: Annotated[
        str | None,
        typer.Option("--snapshot-epochs", help="Record feature evolution after these epochs, e.g. 0,1,2,5 (0: at init)."),
    ] = None,
    snapshot_channels: Annotated[
        int | None, typer.Option("--snapshot-channels", min=1, help="Channels followed per conv stage (default: 4).")
    ] = None,
    init_from: Annotated[
        str | None,
        typer.Option("--from", help="Start from 'pretrained' or a checkpoint/weights file; its classifier head is replaced."),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights", "-w",
            help="pretrained, random (seeded init) or a weights/checkpoint file of --arch to start from; the classifier "
            "head (found from the graph) is replaced for the data's classes. Same as --from, plus random "
            "(default: random).",
        ),
    ] = None,
    freeze: Annotated[
        str | None,
        typer.Option("--freeze", help="none, features (conv layers fixed) or all-but-last (only the new head trains); "
                     "found from the graph and listed in result.json."),
    ] = None,
    precision: PrecisionOpt = None,
    channels_last: Annotated[
        bool | None, typer.Option("--channels-last/--no-channels-last", help="NHWC tensors (can be faster on CPU).")
    ] = None,
    device: DeviceOpt = "auto",
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --output from its last.pt. With --epochs N, extend it (finished or "
            "not) to N epochs; the learning-rate schedule is then re-planned over N.",
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Start a new run in a folder that holds an earlier run (its files, as run.json records them, are "
            "replaced; nothing else) or files convscope did not write (left alone). A file named like a run's "
            "(best.pt, config.json...) that no run here wrote is never replaced.",
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Train a model on Fashion-MNIST, digits or an image folder; checkpoints each epoch, resumable.

    Writes config.json, metrics.jsonl, last.pt (every epoch), best.pt (best validation accuracy;
    without --val-split a seeded part of the training images is held out), result.json (with the
    test accuracy of best.pt, measured once), and with --snapshot-epochs the feature-evolution
    pictures (evolution.png). Checkpoints carry a checksum and are verified when read.
    Use the result anywhere with --weights RUN/best.pt.

    run.json records the run: its id, a fingerprint of the data (file names, sizes, modification
    times) and the sha256 of every file it wrote. A folder that holds an earlier run is refused
    unless --resume (continue it) or --overwrite (replace its recorded files); files convscope did
    not write are never replaced, and --resume refuses data that changed since the run started.

    Extending a run: --resume --epochs N trains on to N epochs (N below the epochs done is refused).
    The learning-rate schedule is defined over all epochs and is re-planned over N: the new epochs
    get the rate a run started with --epochs N has at those steps, so in a finished onecycle or cosine
    run the rate rises again (a warm restart) and decays to the floor by epoch N.

    Examples:
      convscope train --data fashion-mnist --arch zfnet_mnist --epochs 20 -b 128 --precision bf16 \\
          --channels-last --augment crop,flip --label-smoothing 0.1 -o runs/fm   (93.25 % test accuracy, 6-9 min on 2 cores)
      convscope train -o runs/fm --resume
      convscope train -o runs/fm --resume --epochs 30   (extend to 30 epochs)
      torchrun --nproc-per-node 2 -m convscope train --data fashion-mnist --arch zfnet_mnist -b 128 -o runs/ddp
          (DistributedDataParallel: -b is the global batch; rank 0 writes the run folder)
      convscope train --data flowers/ --from runs/fm/best.pt --freeze features -o runs/transfer
      convscope train --data photos/ --arch torchvision:resnet18 --weights pretrained --freeze features -o runs/r18
          (torchvision:NAME or timm:NAME: the head is found from the graph and replaced for the folder's classes;
          best.pt records the spec, so 'convscope classify --weights runs/r18/best.pt' rebuilds it)
    """
    from convscope.distributed import env_world
    from convscope.training.config import TrainConfig, load_run_config
    from convscope.training.loop import train

    given: dict[str, Any] = {
        "data": data, "arch": arch, "epochs": epochs, "batch_size": batch_size, "lr": lr, "optimizer": optimizer,
        "weight_decay": weight_decay, "schedule": schedule, "label_smoothing": label_smoothing,
        "augment": None if augment is None else tuple(a for a in augment.split(",") if a.strip()),
        "seed": seed, "val_split": val_split, "limit": limit, "snapshot_epochs": _epoch_list(snapshot_epochs),
        "snapshot_channels": snapshot_channels, "init_from": init_from, "freeze": freeze, "precision": precision,
        "channels_last": channels_last,
    }
    given = {k: v for k, v in given.items() if v is not None}
    flags = dict(_FLAGS)
    if weights is not None:
        if init_from is not None and init_from != weights:
            raise BadArgument("--weights", f"and --from {shown(init_from)} both say what to start from",
                              "give one of them")
        given["init_from"] = weights
        flags["init_from"] = "--weights"
    if resume and overwrite:
        raise BadArgument("--overwrite", "cannot be combined with --resume", "--resume continues the run in --output")
    if not resume and "data" not in given:
        raise BadArgument("--data", "is required", "fashion-mnist, digits or a folder of class sub-folders")
    # Under torchrun rank 0 alone prepares, locks and reports; the other ranks only train.
    rank0 = env_world().is_rank0
    if rank0:
        prepare_folder(output)
    with _cli_wording(flags), _run_folder(output, "train") if rank0 else nullcontext(), _train_display() as show:
        if resume:
            # Options not repeated come from the run; repeated ones must agree (the library checks),
            # except --epochs, which extends the run.
            recorded = load_run_config(output)
            config = dataclasses.replace(recorded, **given, out_dir=str(output), device=device, resume=True)
        else:
            recorded = None
            config = TrainConfig(out_dir=str(output), device=device, **given)
        result = train(config, show if rank0 else None, overwrite=overwrite)
    if not rank0:
        return
    if recorded is not None and config.epochs != recorded.epochs:
        typer.echo(
            f"note: {output}: extended from epoch {result.resumed_from} (planned: {recorded.epochs}) to "
            f"{config.epochs} epochs; the learning-rate schedule was re-planned over {config.epochs} epochs",
            err=True,
        )
    if result.skipped:
        path, reason = result.skipped[0]
        typer.echo(
            f"warning: skipped {len(result.skipped)} unreadable images (listed in {output / 'data.json'}); "
            f"first: {path}: {reason}",
            err=True,
        )
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    if json_out:
        typer.echo(json.dumps({
            "arch": result.config.arch, "head": result.head, "frozen": result.frozen,
            "notes": list(result.notes), "run_dir": str(result.run_dir), "best_epoch": result.best_epoch, "selection": result.selection,
            "validation": result.data.get("validation"), "best": result.best, "test": result.test, "parameters": result.parameters, "trainable_parameters": result.trainable,
            "skipped": len(result.skipped), "evolution": str(result.evolution) if result.evolution else None,
            "world_size": result.world_size,
        }, indent=2))
        return
    best = result.best
    if result.selection == "val":
        chosen = f"chosen on val accuracy {best['val_accuracy']:.4f}; validation: {result.data.get('validation')}"
    else:
        chosen = f"the last epoch (no validation split); train accuracy {best['train_accuracy']:.4f}"
    if result.frozen is not None and result.frozen.get("description"):
        typer.echo(f"{result.config.arch}: {result.frozen['description']}")
    typer.echo(f"best epoch {result.best_epoch}/{result.config.epochs}: {chosen}")
    if result.test is not None:
        typer.echo(f"test accuracy of best.pt: {result.test['accuracy']:.4f} ({result.test['count']} images, measured once)")
    typer.echo(f"checkpoint: {result.best_checkpoint}  (use it with --weights {result.best_checkpoint})")
    if result.evolution:
        typer.echo(f"feature evolution: {result.evolution}")


def evaluate_command(
    weights: Annotated[str, typer.Option("--weights", "-w", help="A convscope checkpoint (or weights file with --model).")],
    data: Annotated[str, typer.Option("--data", "-d", help="fashion-mnist, digits, or a folder of class sub-folders.")],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", readable=False, help="Folder for confusion.png and evaluation.json."),
    ] = None,
    model: ModelOpt = None,
    split: Annotated[
        str, typer.Option("--split", help="auto (test; every image of a flat folder), test, val, train or all.")
    ] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")] = 512,
    limit: LimitOpt = None,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Accuracy, per-class accuracy and the confusion matrix of a trained model.

    Examples:
      convscope evaluate --weights runs/fm/best.pt --data fashion-mnist -o runs/fm/eval
      convscope evaluate --weights runs/transfer/best.pt --data holdout_photos/ --json
    """
    from convscope.models.load import load_model
    from convscope.render.training import confusion_picture
    from convscope.training.evaluate import evaluate, trained_on

    out = OutputDir(output) if output is not None else None
    loaded = load_model(model, weights, device=device)
    trained = trained_on(weights) if Path(weights).is_file() else None
    with _cli_wording():
        result = evaluate(loaded, data, split=split, batch_size=batch_size, limit=limit, trained=trained)
    if result.note:
        typer.echo(f"note: {result.note}", err=True)
    if result.includes_training and split != "train":
        typer.echo(
            f"warning: {data} includes images {weights} was trained on: accuracy is optimistic "
            "(the run held none out; evaluate on a separate folder)", err=True,
        )
    payload = {"weights": weights, "data": data, "model": loaded.name, **result.as_dict()}
    written: list[Path] = []
    if out is not None:
        written.append(out.json("evaluation.json", payload))
        written.append(out.png("confusion.png", confusion_picture(result.confusion, result.categories)))
        out.manifest("evaluate", {"weights": weights, "data": data, "split": split, "limit": limit})
    if json_out:
        typer.echo(json.dumps(payload, indent=2))
        return
    typer.echo(f"{result.split}: {result.count} images, accuracy {result.accuracy:.4f} (error {100 * (1 - result.accuracy):.2f} %), loss {result.loss:.4f}")
    width = max(len(name) for name in result.categories)
    for name, value in zip(result.categories, result.per_class.tolist(), strict=True):
        shown = "   -  " if math.isnan(value) else f"{value:.4f}"
        typer.echo(f"  {name.ljust(width)}  {shown}")
    if written:
        typer.echo(f"wrote {written[1]} and {written[0]}")


def ablate_command(
    output: RunDirOpt,
    data: Annotated[str, typer.Option("--data", "-d", help="fashion-mnist, digits, or a folder of class sub-folders.")],
    arch: Annotated[str, typer.Option("--arch", "-a", "--model", "-m", help="Base architecture, e.g. zfnet_mnist.")],
    variant: Annotated[
        list[str],
        typer.Option("--variant", help="Repeatable: drop:conv3,conv4 | width:conv2=512 | several joined by ';'."),
    ],
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    optimizer: OptimizerOpt = None,
    augment: AugmentOpt = None,
    seed: SeedOpt = None,
    val_split: ValSplitOpt = None,
    limit: LimitOpt = None,
    precision: PrecisionOpt = None,
    no_base: Annotated[bool, typer.Option("--no-base", help="Do not train the unchanged model.")] = False,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Ablation study (Zeiler & Fergus Table 3): train variants with one seed and budget, tabulate errors.

    Writes one run folder per variant, ablation.md and ablation.json. Rerunning the same command
    reuses finished variants and resumes an interrupted one; a variant folder holding a run of other
    options, or files convscope did not write, is refused, and so are an ablation.md or ablation.json
    convscope did not write (their checksums are kept in ablation.run.json).

    Example:
      convscope ablate --data fashion-mnist --arch zfnet_mnist --variant drop:conv3,conv4 \\
          --variant width:conv2=128 --epochs 5 -o runs/ablation
    """
    from convscope.training.ablation import ablate
    from convscope.training.config import TrainConfig

    given: dict[str, Any] = {
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "optimizer": optimizer, "seed": seed,
        "augment": None if augment is None else tuple(a for a in augment.split(",") if a.strip()),
        "val_split": val_split, "limit": limit, "precision": precision,
    }
    config = TrainConfig(
        data=data, arch=arch, out_dir=str(output), device=device, **{k: v for k, v in given.items() if v is not None}
    )
    prepare_folder(output)
    with _cli_wording(), _run_folder(output, "ablate"), _ablation_display() as show:
        result = ablate(config, variant, include_base=not no_base, progress=show)
    if json_out:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    typer.echo(result.markdown, nl=False)
    typer.echo(f"wrote {output / 'ablation.md'} and {output / 'ablation.json'}")


@contextmanager
def _ablation_display() -> Iterator[Callable[[str, Any], None]]:
    displays: dict[str, Any] = {}
    stack: list[Any] = []
    try:
        def show(name: str, event: Any) -> None:
            if name not in displays:
                for context in stack:
                    context.__exit__(None, None, None)
                stack.clear()
                context = _train_display(name)
                displays[name] = context.__enter__()
                stack.append(context)
            displays[name](event)

        yield show
    finally:
        for context in stack:
            context.__exit__(None, None, None)


@contextmanager
def _run_folder(folder: Path, command: str) -> Iterator[None]:
    """Hold the run folder's lock (one writer at a time) and clear what killed runs left in it."""
    from convscope.imageio import remove_stale_temps
    from convscope.training.runlock import run_lock

    with run_lock(folder, command) as lock:
        if lock.previous.get("pid"):
            typer.echo(
                f"note: {folder}: taking over the lock of {lock.previous.get('command', 'a run')} "
                f"pid {lock.previous['pid']}, which is no longer running", err=True,
            )
        for sub in (folder, *(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())):
            remove_stale_temps(sub)
        yield
