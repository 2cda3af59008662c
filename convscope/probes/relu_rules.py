"""Backward rules for rectifiers: deconvnet (Zeiler & Fergus 2014) and guided backprop
(Springenberg et al. 2015), swapped in for one forward pass and gone afterwards.

The rule is applied without touching the model. While the block is open a
``TorchFunctionMode`` sees every rectifier the forward pass evaluates, whether it comes from
an ``nn.ReLU``/``nn.ReLU6`` module or from a functional call (``F.relu``, ``torch.relu``,
``x.relu_()``, ``F.relu6``, ``F.hardtanh(x, 0, m)``), and evaluates it through a custom
autograd function whose forward is the original op (same values, and in place when the caller
asked for in place) and whose backward is the rule:

=============  ===============================  ==========================================
rectifier      deconvnet                        guided
=============  ===============================  ==========================================
ReLU           ``relu(g)``                      ``relu(g * [x > 0])``
ReLU6 / clip   ``relu(g) * [x < m]``            ``relu(g * [0 < x < m])``
=============  ===============================  ==========================================

``g`` is the gradient arriving at the rectifier's output and ``x`` its forward input. A clipped
ReLU ``min(max(x, 0), m)`` is treated as a ReLU followed by a clip at ``m``: the rule replaces
the ReLU part and the clip keeps its ordinary gradient (zero where the input was above ``m``).
This is what captum's ``Deconvolution``/``GuidedBackprop`` compute on the same network with
each ``ReLU6`` written as ``nn.ReLU`` followed by ``clamp(max=6)``. Captum and pytorch-grad-cam
hook ``nn.ReLU`` modules only, so on a ReLU6 network (EfficientNet-Lite) they silently return
plain gradients; on ``nn.ReLU`` networks the rules here give their numbers.

Activations without a rule (SiLU, GELU, Hardswish, LeakyReLU, ELU, ...) keep their ordinary
gradient, and :meth:`RuleState.warnings` says how many of each the pass went through, so a
method never passes plain gradients off as guided ones. Rectifiers written as
``clamp(min=0)``/``maximum(x, 0)`` and activations inside TorchScript modules are not seen;
TorchScript submodules are reported in the warnings.

Where each evaluation happened is recorded too: while the block is open, forward hooks on the
model's submodules keep the stack of running modules, and each rectifier or activation is named
by its *site*: ``features.0.2 (Hardswish)`` for an activation module, ``features (ReLU,
functional)`` for a call in a module's own ``forward`` (torchvision DenseNet's final ``F.relu``,
timm's blocks). Functional rectifiers get the rule like modules do (captum and pytorch-grad-cam,
which hook ``nn.ReLU`` modules, miss them). :meth:`RuleState.report` turns the sites into a
:class:`RuleReport`: the ``"rules"`` record of a result's JSON and its one warning line. Gates
(sigmoid, hard sigmoid, tanh) are not rectifiers and are not listed.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

RULES = ("deconvnet", "guided")
RULE_TITLES = {"guided": "guided backprop", "deconvnet": "deconvnet"}
# What a result is when the rule reached no rectifier at all.
NO_RECTIFIER = {
    "guided": "no rectifier: this map equals the saliency map",
    "deconvnet": "no rectifier: these projections are the plain gradient of the activation",
}


@dataclass(frozen=True)
class RuleReport:
    """Which activations of one pass got the rectifier rule, and which did not.

    A *site* is one activation module (``features.0.2 (Hardswish)``) or one module whose own
    ``forward`` calls the function (``features (ReLU, functional)``); a module called several
    times per pass (ResNet's block ReLU) is one site.

    Attributes:
        rule: ``"deconvnet"`` or ``"guided"``.
        rectifiers: sites the rule was applied to, in first-call order.
        functional: the ones among ``rectifiers`` that are function calls, not modules.
        without_rule: activation sites that kept their ordinary gradient (SiLU, GELU,
            Hardswish, LeakyReLU...), in first-call order.
        scripted: TorchScript submodules, whose activations cannot be seen.
        without_kinds: ``(kind, sites)`` pairs of ``without_rule``, for the warning.
    """

    rule: str
    rectifiers: tuple[str, ...] = ()
    functional: tuple[str, ...] = ()
    without_rule: tuple[str, ...] = ()
    scripted: int = 0
    without_kinds: tuple[tuple[str, int], ...] = ()

    @property
    def applied(self) -> bool:
        """True when at least one rectifier got the rule (else the result is a plain gradient)."""
        return bool(self.rectifiers)

    @property
    def note(self) -> str | None:
        """What the result is, when it is not a pure rule-based backward pass (``None``: it is)."""
        parts = []
        if not self.rectifiers:
            parts.append(NO_RECTIFIER[self.rule])
        elif self.without_rule:
            parts.append(f"{_count(len(self.without_rule), 'activation')} without a rule kept the plain gradient: "
                         f"a mix of the {self.rule} rule and plain gradients")
        if self.scripted:
            parts.append(f"{_count(self.scripted, 'TorchScript submodule')} not seen: the rule may be incomplete")
        return "; ".join(parts) or None

    def record(self) -> dict[str, Any]:
        """The ``"rules"`` field of the method's JSON record.

        ``{"rule": "guided", "rectifiers": 12, "functional": ["features (ReLU, functional)"],
        "without_rule": ["features.0.2 (Hardswish)", ...], "scripted": 0, "note": "..." or None}``:
        ``rectifiers`` counts the sites that got the rule; the lists name sites.
        """
        return {"rule": self.rule, "rectifiers": len(self.rectifiers), "functional": list(self.functional),
                "without_rule": list(self.without_rule), "scripted": self.scripted, "note": self.note}

    def warning(self) -> str | None:
        """One line for the CLI when the result is not a pure rule-based pass (``None``: it is)."""
        note = self.note
        if note is None:
            return None
        seen = ", ".join(f"{n} {kind}" for kind, n in self.without_kinds)
        detail = f" ({seen} without a rule)" if seen else ("" if self.rectifiers else " (no activation ran)")
        return f"{RULE_TITLES[self.rule]}{detail}: {note}"


def _count(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


@dataclass
class RuleState:
    """What a ``relu_rule`` block saw, and a switch for its backward passes.

    Attributes:
        rule: ``"deconvnet"`` or ``"guided"``.
        active: when ``False``, backward passes through the swapped rectifiers give the
            ordinary gradient (one forward pass can then serve a plain and a guided
            backward, as guided Grad-CAM needs). Read at backward time.
        rectifiers: rectifier evaluations the rule was applied to, by kind (``ReLU``, ``ReLU6``).
        unsupported: activation evaluations with no rule, by kind (``SiLU``, ``GELU``...).
        scripted: TorchScript submodules of the model, whose insides cannot be seen.
        sites: each site seen (see :class:`RuleReport`) -> ``(kind, got the rule)``, in
            first-call order.
    """

    rule: str
    active: bool = True
    rectifiers: Counter[str] = field(default_factory=Counter)
    unsupported: Counter[str] = field(default_factory=Counter)
    scripted: int = 0
    sites: dict[str, tuple[str, bool]] = field(default_factory=dict)
    _running: list[tuple[str, nn.Module]] = field(default_factory=list, repr=False)

    def _seen(self, kind: str, ruled: bool) -> None:
        """Count one evaluation of ``kind`` at the innermost running module."""
        (self.rectifiers if ruled else self.unsupported)[kind] += 1
        if not self._running:
            site = f"outside the model ({kind})"
        else:
            path, module = self._running[-1]
            if type(module).__module__ == "torch.nn.modules.activation":
                site = f"{path or 'model'} ({kind})"
            else:
                site = f"{path or 'model'} ({kind}, functional)"
        self.sites.setdefault(site, (kind, ruled))

    def report(self) -> RuleReport:
        """The sites seen so far as a :class:`RuleReport`."""
        ruled = tuple(site for site, (_, got) in self.sites.items() if got)
        kinds = Counter(kind for kind, got in self.sites.values() if not got)
        return RuleReport(
            rule=self.rule,
            rectifiers=ruled,
            functional=tuple(site for site in ruled if site.endswith(", functional)")),
            without_rule=tuple(site for site, (_, got) in self.sites.items() if not got),
            scripted=self.scripted,
            without_kinds=tuple(sorted(kinds.items())),
        )

    @property
    def rectified(self) -> int:
        """How many rectifier evaluations got the rule."""
        return sum(self.rectifiers.values())

    def warnings(self) -> tuple[str, ...]:
        """One line per way the result differs from a pure rule-based backward pass."""
        lines = []
        for kind, count in sorted(self.unsupported.items()):
            lines.append(
                f"{self.rule} rule not applied to {count} {kind} activation{'s' if count != 1 else ''}"
                " (no such rule for them; plain gradients pass through)"
            )
        if self.scripted:
            lines.append(
                f"{self.scripted} TorchScript submodule{'s' if self.scripted != 1 else ''}: "
                f"activations inside them cannot be seen, so the {self.rule} rule may be incomplete"
            )
        if not self.rectifiers and not self.unsupported:
            lines.append(f"no ReLU activation ran: the {self.rule} result is the plain gradient")
        return tuple(lines)


class _Rectifier(torch.autograd.Function):
    """Forward: the original rectifier, exactly. Backward: the rule in ``state``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        op: Callable[[torch.Tensor], torch.Tensor],
        upper: float,
        inplace: bool,
        state: RuleState,
    ) -> torch.Tensor:
        out = op(x)
        if inplace:
            ctx.mark_dirty(x)
        # Save what autograd's own relu/hardtanh save (the result; hardtanh out of place: its
        # input), so in-place edits elsewhere in the model break exactly when they would break
        # the plain backward too. Either one gives the masks: the clip keeps the signs and
        # which side of ``upper`` a value is on.
        ctx.save_for_backward(x if math.isfinite(upper) and not inplace else out)
        ctx.upper = upper
        ctx.state = state
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (saved,) = ctx.saved_tensors
        upper: float = ctx.upper
        state: RuleState = ctx.state
        if state.active and state.rule == "deconvnet":
            result = grad.clamp_min(0)
            if math.isfinite(upper):
                result = torch.ops.aten.hardtanh_backward(result, saved, -math.inf, upper)
            return result, None, None, None, None
        # The ordinary backward (fused kernels, no extra mask tensors)...
        if math.isfinite(upper):
            result = torch.ops.aten.hardtanh_backward(grad, saved, 0.0, upper)
        else:
            result = torch.ops.aten.threshold_backward(grad, saved, 0.0)
        if state.active:  # ...then guided: only positive signals pass.
            result = result.clamp_min_(0)
        return result, None, None, None, None


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


# Functional entry points of rectifiers. nn.ReLU calls F.relu and nn.ReLU6 calls F.hardtanh,
# so modules arrive here too. Clips map to "always in place?".
_RELU_CALLS: set[Any] = {F.relu, torch.relu, torch.Tensor.relu}
_RELU_INPLACE_CALLS: set[Any] = {torch.relu_, F.relu_, torch.Tensor.relu_}
_CLIP_CALLS: dict[Any, bool] = {F.hardtanh: False, F.hardtanh_: True, F.relu6: False}

_UNSUPPORTED_NAMES = {
    "silu": "SiLU", "gelu": "GELU", "hardswish": "Hardswish", "leaky_relu": "LeakyReLU",
    "leaky_relu_": "LeakyReLU", "elu": "ELU", "elu_": "ELU", "selu": "SELU", "selu_": "SELU",
    "celu": "CELU", "celu_": "CELU", "mish": "Mish", "softplus": "Softplus", "prelu": "PReLU",
    "rrelu": "RReLU", "rrelu_": "RReLU", "threshold": "Threshold", "threshold_": "Threshold",
}  # fmt: skip
_UNSUPPORTED_CALLS: dict[Any, str] = {
    getattr(F, name): kind for name, kind in _UNSUPPORTED_NAMES.items() if hasattr(F, name)
}
_UNSUPPORTED_CALLS[torch.prelu] = "PReLU"


class _RuleMode(TorchFunctionMode):
    def __init__(self, state: RuleState) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _RELU_CALLS or func in _RELU_INPLACE_CALLS:
            x = _arg(args, kwargs, 0, "input", None)
            if func in _RELU_INPLACE_CALLS:
                inplace = True
            else:
                inplace = func is F.relu and bool(_arg(args, kwargs, 1, "inplace", False))
            return self._rectify(func, args, kwargs, x, "ReLU", math.inf, inplace)
        if func in _CLIP_CALLS:
            x = _arg(args, kwargs, 0, "input", None)
            if func is F.relu6:
                low, high = 0.0, 6.0
                inplace = bool(_arg(args, kwargs, 1, "inplace", False))
            else:
                low = float(_arg(args, kwargs, 1, "min_val", -1.0))
                high = float(_arg(args, kwargs, 2, "max_val", 1.0))
                inplace = _CLIP_CALLS[func] or bool(_arg(args, kwargs, 3, "inplace", False))
            if low == 0.0 and high > 0.0:
                kind = "ReLU6" if high == 6.0 else "clipped ReLU"
                return self._rectify(func, args, kwargs, x, kind, high, inplace)
            self.state._seen("Hardtanh", ruled=False)
            return func(*args, **kwargs)
        kind = _UNSUPPORTED_CALLS.get(func)
        if kind is not None:
            self.state._seen(kind, ruled=False)
        return func(*args, **kwargs)

    def _rectify(
        self,
        func: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        x: Any,
        kind: str,
        upper: float,
        inplace: bool,
    ) -> Any:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return func(*args, **kwargs)
        self.state._seen(kind, ruled=True)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return func(*args, **kwargs)
        # The mode is off inside its own handler, so the original op runs unintercepted.
        return _Rectifier.apply(x, lambda t: func(*args, **kwargs), upper, inplace, self.state)


@contextmanager
def relu_rule(module: nn.Module, rule: str) -> Iterator[RuleState]:
    """Apply a rectifier backward rule to every forward pass run inside the block.

    Nothing on ``module`` changes; the rule lives in the autograd graph built inside the
    block, so the backward pass may run inside or after it.

    Args:
        module: the network (checked for TorchScript parts the rule cannot reach).
        rule: ``"deconvnet"`` or ``"guided"``.

    Yields:
        a :class:`RuleState` counting what was swapped, by kind and by site; its ``report()``
        goes into results.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, not {rule!r}")
    state = RuleState(rule=rule)
    state.scripted = sum(isinstance(m, torch.jit.ScriptModule) for m in module.modules())
    with running_modules(module, state._running), _RuleMode(state):
        yield state


@contextmanager
def running_modules(module: nn.Module, running: list[tuple[str, nn.Module]]) -> Iterator[None]:
    """Keep ``running`` as the stack of ``module``'s submodules whose forward is running (this
    thread's calls only: a model shared with another thread is left alone)."""
    thread = threading.get_ident()

    def enter(path: str, sub: nn.Module) -> Callable[..., None]:
        def hook(_: nn.Module, inputs: object) -> None:
            if threading.get_ident() == thread:
                running.append((path, sub))
        return hook

    def leave(sub: nn.Module) -> Callable[..., None]:
        def hook(_: nn.Module, inputs: object, output: object) -> None:
            if threading.get_ident() != thread:
                return
            # Pop down to this module's own entry (an exception may have skipped inner exits).
            for depth in range(len(running) - 1, -1, -1):
                if running[depth][1] is sub:
                    del running[depth:]
                    break
        return hook

    handles = []
    try:
        for path, sub in module.named_modules():
            if isinstance(sub, torch.jit.ScriptModule):
                continue
            handles.append(sub.register_forward_pre_hook(enter(path, sub)))
            handles.append(sub.register_forward_hook(leave(sub), always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        running.clear()
