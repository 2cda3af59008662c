"""Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019): LRP rules installed
on a network for the forward passes run inside a ``with`` block, and gone afterwards.

Contract of :func:`lrp_rules`: while the block is open, every forward pass through ``module``
builds an autograd graph whose backward pass carries *relevance* instead of gradients, in
zennit's convention. Backpropagate ``grad_outputs = one_hot(target) * logits`` from the logits and

* the gradient arriving at the input tensor is the input relevance ``(N, C, H, W)``;
* the gradient arriving at any intermediate output (a tensor kept by
  ``convscope.probes.hooks.capture(..., mode="graph")`` or by a forward hook) is the relevance of
  that output: a channel's relevance is that gradient summed over space, and masking it to one
  channel before continuing the backward pass gives the channel's conditional relevance (CRP).

Forward values are those of the untouched model (each layer runs its own ``forward``); nothing on
the model is changed (no parameter is written, BatchNorm is merged only inside the backward
rules), and every hook is removed when the block ends, also on an exception. Parameters are
read at the first backward pass of the block. One backward pass serves the whole batch.

The rules (``x`` a layer's input, ``R`` the relevance at its output, ``z = f(x; W, b)`` the
layer, ``x⁺ = max(x, 0)``, ``x⁻ = min(x, 0)``, ``W⁺``/``W⁻`` likewise; ``stab(z)`` adds 1e-6
with the sign of ``z``, zero counting as positive):

=============  =================================================================================
epsilon        ``x · fᵀ(R / stab_ε(z))``
z-plus         ``x⁺ fᵀ(s; W⁺) + x⁻ fᵀ(s; W⁻)`` with ``s = R / stab(f(x⁺; W⁺, b⁺) + f(x⁻; W⁻))``
alpha-beta     ``α`` times the z-plus share minus ``β`` times the same share of the negative part
               (``f(x⁺; W⁻, b⁻) + f(x⁻; W⁺)``); ``α = 2, β = 1``
gamma          z-plus with ``W + γW⁺`` for the positive part and ``W + γW⁻`` for the negative one;
               units with ``z > 0`` share their relevance by the positive part, ``z < 0`` by the
               negative one (the generalised gamma rule of zennit)
z-box          ``x fᵀ(s; W) − l fᵀ(s; W⁺) − h fᵀ(s; W⁻)``, ``s = R / stab(z − f(l; W⁺, b⁺) −
               f(h; W⁻, b⁻))``, with ``l``/``h`` the lowest/highest input values per channel
flat           ``fᵀ(R / stab(f(1; 1)))``: relevance spread evenly over the receptive field
norm           ``x · opᵀ(R / stab(op(x)))`` for average pools and residual sums
pass           ``R`` unchanged through activations and merged BatchNorms
=============  =================================================================================

Composites (zennit's ``EpsilonPlusFlat``, ``EpsilonGammaBox``, ``EpsilonAlpha2Beta1``):
``nn.Linear`` layers take epsilon; convolutions take z-plus, gamma or alpha-beta; the first
convolution (or linear layer, for flat) in module order takes flat or z-box. Activation modules
and BatchNorm pass relevance; average pools and residual additions take the norm rule; max pools
and shape operations (flatten, padding, dropout) keep their gradient, which routes relevance.

Canonization, as zennit's ``SequentialMergeBatchNorm`` and ``ResNetCanonizer`` do it: a BatchNorm
that directly follows a convolution or linear layer in module order, and reads that layer's
output in the forward pass, is merged into its rule (``W·s``, ``(b − μ)·s + β`` with
``s = γ / sqrt(σ² + eps)``); a residual addition written as a functional ``a + b`` between two
equally shaped activations inside the model (ResNet's ``out += identity``, EfficientNet-Lite's
``out + x``) is found by a ``TorchFunctionMode`` and takes the norm rule like zennit's ``Sum``.

Layers no rule covers keep their gradient and are named in :attr:`LrpState.uncovered`: leaf
modules with parameters of another kind (LayerNorm, GroupNorm, PReLU...), BatchNorms that could
not be merged, and modules whose own forward multiplies two activations (squeeze-excitation
gates, attention).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from convscope.errors import BadArgument, close_matches
from convscope.probes.relu_rules import running_modules

COMPOSITES = ("epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1")
STABILIZER = 1e-6  # zennit's stabiliser of every rule but epsilon

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_AFFINES = (*_CONVS, *_CONV_TRANSPOSES, nn.Linear)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_AVG_POOLS = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)  # fmt: skip
# Elementwise activation modules: relevance passes them unchanged (zennit's ``Activation``).
_ACTIVATIONS = (
    nn.ELU, nn.Hardshrink, nn.Hardsigmoid, nn.Hardtanh, nn.Hardswish, nn.LeakyReLU, nn.LogSigmoid,
    nn.PReLU, nn.ReLU, nn.ReLU6, nn.RReLU, nn.SELU, nn.CELU, nn.GELU, nn.Sigmoid, nn.SiLU, nn.Mish,
    nn.Softplus, nn.Softshrink, nn.Softsign, nn.Tanh, nn.Tanhshrink, nn.Threshold,
)  # fmt: skip
_ADDS: dict[Any, bool] = {  # functional additions -> in place?
    torch.add: False, torch.Tensor.add: False, torch.Tensor.__add__: False, torch.Tensor.__radd__: False,
    torch.Tensor.__iadd__: True, torch.Tensor.add_: True,
}  # fmt: skip
_PRODUCTS = {
    torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.mul_,
    torch.Tensor.__imul__, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm,
    torch.div, torch.Tensor.div, torch.Tensor.__truediv__, torch.einsum,
}  # fmt: skip


@dataclass(frozen=True)
class Rule:
    """One LRP rule: ``kind`` (epsilon, zplus, gamma, alphabeta, zbox, flat) and its parameters."""

    kind: str
    epsilon: float = STABILIZER
    gamma: float = 0.0
    alpha: float = 2.0
    beta: float = 1.0
    low: torch.Tensor | None = None
    high: torch.Tensor | None = None


@dataclass
class LrpState:
    """What an :func:`lrp_rules` block installed and saw.

    Attributes:
        composite: the composite's name.
        rules: module path -> rule kind (``"pass"``, ``"norm"`` or an affine rule), for the
            modules hooked at the start of the block.
        merged: BatchNorm paths merged into the preceding layer during the last forward pass.
        residual_sums: functional residual additions given the norm rule so far.
    """

    composite: str
    rules: dict[str, str] = field(default_factory=dict)
    merged: set[str] = field(default_factory=set)
    residual_sums: int = 0
    _uncovered: dict[str, None] = field(default_factory=dict, repr=False)
    _running: list[tuple[str, nn.Module]] = field(default_factory=list, repr=False)

    @property
    def uncovered(self) -> tuple[str, ...]:
        """Module paths no rule covers (relevance passes them as a plain gradient), in the order
        they were found."""
        return tuple(self._uncovered)

    def _flag(self, path: str) -> None:
        self._uncovered.setdefault(path or "model", None)


def box_bounds(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, high)`` ``(1, C, 1, 1)``: the normalised values of pixels 0 and 1 per channel,
    the z-box rule's input bounds for a model normalising ``[0, 1]`` pixels with ``mean``/``std``."""
    m = torch.tensor(list(mean), dtype=torch.float64).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float64).view(1, -1, 1, 1)
    return ((0 - m) / s).float(), ((1 - m) / s).float()


def composite_rules(
    composite: str, *, epsilon: float, gamma: float, low: Any = None, high: Any = None
) -> tuple[Rule, Rule, Rule | None, tuple[type[nn.Module], ...]]:
    """``(convolution rule, linear rule, first-layer rule, types the first-layer rule takes)``."""
    linear = Rule("epsilon", epsilon=epsilon)
    if composite == "epsilon-plus-flat":
        return Rule("zplus"), linear, Rule("flat"), _AFFINES
    if composite == "epsilon-alpha2-beta1":
        return Rule("alphabeta", alpha=2.0, beta=1.0), linear, None, ()
    if composite == "epsilon-gamma-box":
        if low is None or high is None:
            raise BadArgument("composite", "epsilon-gamma-box needs the input bounds low and high",
                              "pass low= and high=, e.g. from box_bounds(mean, std)")
        box = Rule("zbox", low=torch.as_tensor(low, dtype=torch.float32),
                   high=torch.as_tensor(high, dtype=torch.float32))
        return Rule("gamma", gamma=gamma), linear, box, (*_CONVS, *_CONV_TRANSPOSES)
    raise BadArgument("composite", f"unknown composite {composite!r}", close_matches(composite, COMPOSITES))


def _stabilize(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``z`` moved away from zero by ``epsilon`` (zero counts as positive)."""
    return torch.where(z >= 0, z + epsilon, z - epsilon)


class _Affine:
    """A convolution or linear layer seen as ``f(u; W, b)``, with the weight variants its rule
    needs, computed once per block (and per merged BatchNorm)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._variants: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __call__(self, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        m = self.module
        if isinstance(m, nn.Linear):
            return F.linear(u, weight, bias)
        if isinstance(m, _CONVS):
            return m._conv_forward(u, weight, bias)  # type: ignore[operator]
        transposed = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[weight.ndim - 2]
        return transposed(u, weight, bias, m.stride, m.padding, m.output_padding, m.groups, m.dilation)  # type: ignore[arg-type]

    def params(
        self, norm: _BatchNorm | None, variant: str = "", gamma: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W, b)`` of the layer, merged with ``norm`` when given, then modified by ``variant``:
        ``""`` as is, ``"+"``/``"-"`` the positive/negative parts, ``"g+"``/``"g-"`` the gamma
        rule's ``W + γW⁺``/``W + γW⁻`` (biases likewise)."""
        key = (id(norm), f"{variant}{gamma if variant.startswith('g') else ''}")
        found = self._variants.get(key)
        if found is not None:
            return found
        with torch.no_grad():
            if variant:
                weight, bias = self.params(norm)
                if variant.startswith("g"):
                    part = _positive if variant == "g+" else _negative
                    weight = weight + gamma * part(weight)
                    bias = None if bias is None else bias + gamma * part(bias)
                else:
                    part = _positive if variant == "+" else _negative
                    weight, bias = part(weight), None if bias is None else part(bias)
            else:
                weight = _tensor(self.module.weight).detach()
                bias = None if self.module.bias is None else _tensor(self.module.bias).detach()
                if norm is not None:
                    weight, bias = _merge(self.module, weight, bias, norm)
        self._variants[key] = (weight, bias)
        return weight, bias


def _positive(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(min=0)


def _negative(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(max=0)


def _tensor(value: Any) -> torch.Tensor:
    assert isinstance(value, torch.Tensor)
    return value


def _merge(
    layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, norm: _BatchNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's parameters with the following BatchNorm folded in (eval statistics)."""
    mean, var = _tensor(norm.running_mean), _tensor(norm.running_var)
    scale = torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        scale = norm.weight.detach() * scale
    shape = [1] * weight.ndim
    shape[1 if isinstance(layer, _CONV_TRANSPOSES) else 0] = -1
    merged_bias = (-mean if bias is None else bias - mean) * scale
    if norm.bias is not None:
        merged_bias = merged_bias + norm.bias.detach()
    return weight * scale.view(shape), merged_bias


def _mergeable(layer: nn.Module, norm: _BatchNorm) -> bool:
    """Whether ``norm`` can be folded into ``layer`` (running statistics, matching channels;
    it must also be in eval mode when it runs)."""
    if norm.running_mean is None:
        return False
    if isinstance(layer, _CONV_TRANSPOSES):
        return layer.groups == 1 and layer.out_channels == norm.num_features
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return bool(channels == norm.num_features)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _affine_relevance(rule: Rule, f: _Affine, norm: _BatchNorm | None, x: torch.Tensor,
                      relevance: torch.Tensor) -> torch.Tensor:
    """The relevance at ``x`` given ``relevance`` at the layer's output (see the module table)."""
    eps = STABILIZER
    with torch.enable_grad():
        if rule.kind == "epsilon":
            u = _leaf(x)
            z = f(u, *f.params(norm))
            (g,) = torch.autograd.grad(z, u, relevance / _stabilize(z.detach(), rule.epsilon))
            return x * g
        if rule.kind == "flat":
            weight, _ = f.params(norm)
            u = torch.ones_like(x, requires_grad=True)
            z = f(u, torch.ones_like(weight), None)
            (g,) = torch.autograd.grad(z, u, relevance / _stabilize(z.detach(), eps))
            return g
        if rule.kind == "zbox":
            assert rule.low is not None and rule.high is not None
            low = _leaf(rule.low.to(x).expand_as(x))
            high = _leaf(rule.high.to(x).expand_as(x))
            u = _leaf(x)
            z = f(u, *f.params(norm)) - f(low, *f.params(norm, "+")) - f(high, *f.params(norm, "-"))
            gx, gl, gh = torch.autograd.grad(z, (u, low, high), relevance / _stabilize(z.detach(), eps))
            return x * gx + low.detach() * gl + high.detach() * gh
        # z-plus, alpha-beta and gamma: a positive and (alpha-beta, gamma) a negative part, each
        # the sum of the positive inputs' and the negative inputs' contributions.
        positive = x.clamp(min=0)
        negative = x.clamp(max=0)
        signed = bool((negative < 0).any())  # after a ReLU the negative terms are exactly zero
        up, un = _leaf(positive), _leaf(negative) if signed else None
        pos, neg = ("g+", "g-") if rule.kind == "gamma" else ("+", "-")

        def part(first: str, second: str) -> torch.Tensor:
            out = f(up, *f.params(norm, first, rule.gamma))
            if un is not None:
                out = out + f(un, f.params(norm, second, rule.gamma)[0], None)
            return out

        zp = part(pos, neg)
        outputs, grads = [zp], [relevance / _stabilize(zp.detach(), eps)]
        if rule.kind != "zplus":
            zn = part(neg, pos)
            outputs.append(zn)
            sn = relevance / _stabilize(zn.detach(), eps)
            if rule.kind == "gamma":
                # zp + zn = (2 + γ) z: its sign is the sign of the layer's output.
                total = zp.detach() + zn.detach()
                grads = [grads[0] * (total > 0), sn * (total < 0)]
            else:
                grads = [grads[0] * rule.alpha, sn * -rule.beta]
        inputs = [up] if un is None else [up, un]
        found = torch.autograd.grad(outputs, inputs, grads)
        result = positive * found[0]
        if un is not None:
            result = result + negative * found[1]
        return result


class _Relevance(torch.autograd.Function):
    """Forward: the layer's own output (computed by the layer). Backward: ``rule(x, R)``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, out: torch.Tensor, rule: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    ) -> torch.Tensor:
        ctx.rule = rule
        if rule is not None:
            ctx.save_for_backward(x)
        return out.detach()

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if ctx.rule is None:
            return relevance, None, None
        (x,) = ctx.saved_tensors
        return ctx.rule(x.detach(), relevance), None, None


class _Sum(torch.autograd.Function):
    """``a + b`` with the norm rule: each summand gets ``R · summand / stab(a + b)``."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, inplace: bool) -> torch.Tensor:  # type: ignore[override]
        total = a + b
        denominator = _stabilize(total, STABILIZER)
        ctx.shares = (a / denominator, b / denominator)
        if inplace:
            ctx.mark_dirty(a)
            return a.copy_(total)
        return total

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        share_a, share_b = ctx.shares
        return relevance * share_a, relevance * share_b, None


class _SumMode(TorchFunctionMode):
    """Gives residual additions inside the model the norm rule; names products of activations."""

    def __init__(self, state: LrpState) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if self.state._running and torch.is_grad_enabled():
            if func in _ADDS and len(args) == 2 and not kwargs and _activations(args[0], args[1]):
                if args[0].shape == args[1].shape:
                    self.state.residual_sums += 1
                    return _Sum.apply(args[0], args[1], _ADDS[func])
            elif func in _PRODUCTS and len(args) >= 2 and _activations(args[0], args[1]):
                self.state._flag(self.state._running[-1][0])
        return func(*args, **kwargs)


def _activations(a: Any, b: Any) -> bool:
    """Two floating tensors in the graph that are not parameters (activations, not weights)."""
    return all(
        isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad and not isinstance(t, nn.Parameter)
        for t in (a, b)
    )


def _leaves(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules (no children) in depth-first module order, as zennit collects them."""
    return [(path, m) for path, m in module.named_modules() if not any(True for _ in m.children())]


@contextmanager
def lrp_rules(
    module: nn.Module,
    composite: str = "epsilon-plus-flat",
    *,
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    low: Any = None,
    high: Any = None,
) -> Iterator[LrpState]:
    """Install the LRP ``composite`` on ``module`` for the forward passes run inside the block.

    See the module docstring for the contract: backpropagating ``one_hot(target) * logits``
    through a forward pass run inside the block gives relevance at the input and at every
    intermediate output; forward values are unchanged, and the model is exactly as before when
    the block ends (hooks removed, nothing written), also after an exception.

    Args:
        module: the network.
        composite: ``"epsilon-plus-flat"``, ``"epsilon-gamma-box"`` or ``"epsilon-alpha2-beta1"``.
        epsilon: the epsilon rule's stabiliser (linear layers).
        gamma: the gamma rule's weight of positive contributions (epsilon-gamma-box).
        low, high: the lowest and highest input values, scalars or ``(1, C, 1, 1)`` tensors
            (epsilon-gamma-box; see :func:`box_bounds`).

    Yields:
        an :class:`LrpState`; its ``uncovered`` names the layers no rule covers (complete once
        a forward pass has run).

    Raises:
        BadArgument: unknown composite, or epsilon-gamma-box without ``low``/``high``.
    """
    conv_rule, linear_rule, first_rule, first_types = composite_rules(
        composite, epsilon=epsilon, gamma=gamma, low=low, high=high
    )
    state = LrpState(composite=composite)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    inputs: dict[int, list[torch.Tensor | None]] = {}
    # BatchNorm -> its layer, when they sit next to each other in module order (zennit's rule);
    # the pairing is confirmed per forward call by the BatchNorm reading the layer's output.
    pairs: dict[int, tuple[str, nn.Module]] = {}
    last_output: dict[int, tuple[torch.Tensor, list[_BatchNorm | None]]] = {}

    previous: tuple[str, nn.Module] | None = None
    for path, leaf in _leaves(module):
        if (previous is not None and isinstance(previous[1], _AFFINES) and isinstance(leaf, _BATCH_NORMS)
                and _mergeable(previous[1], leaf)):
            pairs[id(leaf)] = previous
        previous = (path, leaf)
    paired = {id(layer) for _, layer in pairs.values()}

    def pre_hook(sub: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0] if args else None
        stack = inputs.setdefault(id(sub), [])
        if not (isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled()):
            stack.append(None)
            return None
        stack.append(x)
        # The layer computes its own output on a detached input (a copy when it works in
        # place), so its plain backward is never built; the forward hook attaches the rule.
        fresh = x.detach().clone() if getattr(sub, "inplace", False) else x.detach()
        return (fresh, *args[1:])

    def make_hook(path: str, sub: nn.Module, kind: str) -> Callable[..., Any]:
        rule = rule_of.get(id(sub))
        affine = _Affine(sub) if rule is not None else None

        def hook(_: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            stack = inputs.get(id(sub))
            x = stack.pop() if stack else None
            if x is None or not isinstance(output, torch.Tensor):
                return None
            if rule is not None and affine is not None:
                merged: list[_BatchNorm | None] = [None]
                out = _Relevance.apply(x, output, _affine_rule(rule, affine, merged))
                if id(sub) in paired:
                    last_output[id(sub)] = (out, merged)
                return out
            if kind == "norm":
                return _Relevance.apply(x, output, _norm_rule(sub))
            if kind == "batchnorm":
                pair = pairs.get(id(sub))
                seen = last_output.pop(id(pair[1]), None) if pair else None
                if seen is not None and seen[0] is x and isinstance(sub, _BatchNorm) and not sub.training:
                    seen[1][0] = sub  # the layer's rule folds this BatchNorm in
                    state.merged.add(path)
                else:
                    state._flag(path)
            return _Relevance.apply(x, output, None)  # pass

        return hook

    rule_of: dict[int, Rule] = {}
    first_done = first_rule is None
    try:
        for path, sub in module.named_modules():
            kind = None
            if isinstance(sub, _AFFINES):
                if not first_done and isinstance(sub, first_types):
                    assert first_rule is not None
                    rule_of[id(sub)], first_done = first_rule, True
                else:
                    rule_of[id(sub)] = linear_rule if isinstance(sub, nn.Linear) else conv_rule
                kind = rule_of[id(sub)].kind
            elif isinstance(sub, _BATCH_NORMS):
                kind = "batchnorm"
            elif isinstance(sub, _AVG_POOLS):
                kind = "norm"
            elif isinstance(sub, _ACTIVATIONS):
                kind = "pass"
            elif not any(True for _ in sub.children()) and any(True for _ in sub.parameters(recurse=False)):
                state._flag(path)
            if kind is None:
                continue
            state.rules[path] = kind
            handles.append(sub.register_forward_pre_hook(pre_hook))
            handles.append(sub.register_forward_hook(make_hook(path, sub, kind), prepend=True))
        with running_modules(module, state._running), _SumMode(state):
            yield state
    finally:
        for handle in handles:
            handle.remove()
        inputs.clear()
        last_output.clear()


def _affine_rule(
    rule: Rule, affine: _Affine, merged: list[_BatchNorm | None]
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def backward(x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        return _affine_relevance(rule, affine, merged[0], x, relevance)
    return backward


def _norm_rule(pool: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def backward(x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            u = _leaf(x)
            z = pool.forward(u)  # ``forward``, not ``__call__``: no hooks
            (g,) = torch.autograd.grad(z, u, relevance / _stabilize(z.detach(), STABILIZER))
        return x * g
    return backward
