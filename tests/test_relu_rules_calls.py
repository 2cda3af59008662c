"""Every spelling of a rectifier gets the rule, exactly once, with the right clip and in place when
asked; everything else passes through untouched and is reported (kills the mutmut survivors of
``probes/relu_rules.py``: ``tools/mutate.py relu_rules``).

Each case checks the guided gradient against a hand-computed one: for ``y = rect(x)`` and a
loss ``sum(w * y)``, guided backprop gives ``relu(w) * [0 < x < upper]`` at ``x``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convscope.probes.relu_rules import relu_rule

# Inputs on both sides of 0, of 1, 3 and 6, none exactly on a kink.
X = torch.tensor([-2.0, -0.5, 0.25, 0.75, 1.5, 2.5, 3.5, 5.0, 7.0])
W = torch.tensor([1.0, -1.0, 2.0, -3.0, 1.5, 0.5, -0.5, 1.0, 2.0])


def guided_expected(upper: float) -> torch.Tensor:
    return W.clamp_min(0) * ((X > 0) & (X < upper)).float()


def guided_grad(call: Callable[[torch.Tensor], torch.Tensor], *, reuse_input: bool = False) -> tuple[torch.Tensor, Any]:
    """d sum(w * call(x)) / dx under the guided rule; ``x`` is a non-leaf, so in-place calls are legal."""
    leaf = X.clone().requires_grad_(True)
    with relu_rule(nn.Identity(), "guided") as state:
        x = leaf * 1.0
        y = call(x)
        loss = (W * y).sum() + ((W * x).sum() if reuse_input else 0.0)
    loss.backward()
    assert leaf.grad is not None
    return leaf.grad, state


OUT_OF_PLACE: list[tuple[str, Callable[[torch.Tensor], torch.Tensor], str, float]] = [
    ("torch.relu(input=x)", lambda x: torch.relu(input=x), "ReLU", float("inf")),
    ("F.relu", lambda x: F.relu(x), "ReLU", float("inf")),
    ("Tensor.relu", lambda x: x.relu(), "ReLU", float("inf")),
    ("F.relu6", lambda x: F.relu6(x), "ReLU6", 6.0),
    ("F.hardtanh(x, 0, 6)", lambda x: F.hardtanh(x, 0.0, 6.0), "ReLU6", 6.0),
    ("F.hardtanh(x, 0, 3)", lambda x: F.hardtanh(x, 0.0, 3.0), "clipped ReLU", 3.0),
    ("F.hardtanh(x, 0, 0.5)", lambda x: F.hardtanh(x, min_val=0.0, max_val=0.5), "clipped ReLU", 0.5),
]
IN_PLACE: list[tuple[str, Callable[[torch.Tensor], torch.Tensor], str, float]] = [
    ("torch.relu_", lambda x: torch.relu_(x), "ReLU", float("inf")),
    ("F.relu(inplace=True)", lambda x: F.relu(x, inplace=True), "ReLU", float("inf")),
    ("Tensor.relu_", lambda x: x.relu_(), "ReLU", float("inf")),
    ("F.relu6(inplace=True)", lambda x: F.relu6(x, inplace=True), "ReLU6", 6.0),
    ("F.hardtanh(inplace=True)", lambda x: F.hardtanh(x, 0.0, 3.0, inplace=True), "clipped ReLU", 3.0),
    ("F.hardtanh_(x, 0, 6)", lambda x: F.hardtanh_(x, 0.0, 6.0), "ReLU6", 6.0),
    ("F.hardtanh_(x, 0, 3)", lambda x: F.hardtanh_(x, 0.0, 3.0), "clipped ReLU", 3.0),
    ("F.hardtanh_(x, 0)", lambda x: F.hardtanh_(x, 0.0), "clipped ReLU", 1.0),  # max_val's default
    ("F.hardtanh_(input=x)", lambda x: F.hardtanh_(input=x, min_val=0.0, max_val=6.0), "ReLU6", 6.0),
]


@pytest.mark.parametrize(("name", "call", "kind", "upper"), OUT_OF_PLACE + IN_PLACE,
                         ids=[c[0] for c in OUT_OF_PLACE + IN_PLACE])
def test_each_spelling_gets_the_rule_once_with_its_clip(name: str, call: Any, kind: str, upper: float) -> None:
    grad, state = guided_grad(call)
    torch.testing.assert_close(grad, guided_expected(upper), rtol=0, atol=0)
    assert dict(state.rectifiers) == {kind: 1} and not state.unsupported


@pytest.mark.parametrize(("name", "call", "kind", "upper"), IN_PLACE, ids=[c[0] for c in IN_PLACE])
def test_in_place_spellings_rewrite_the_input_and_its_history(name: str, call: Any, kind: str, upper: float) -> None:
    # After an in-place rectifier the input *is* the output: a later use of it carries the rule
    # too (the rectifier marks it dirty), so the loss sum(w*y) + sum(w*x) has twice the gradient.
    grad, _ = guided_grad(call, reuse_input=True)
    torch.testing.assert_close(grad, 2 * guided_expected(upper), rtol=0, atol=0)


def test_in_place_edits_after_the_rectifier_behave_as_with_plain_autograd() -> None:
    # relu saves its output: editing its input afterwards is fine, editing its output is an error.
    # hardtanh (out of place) saves its input: the other way round. The rule saves the same ones.
    def edit_input(op: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            y = op(x)
            x.mul_(2.0)
            return y
        return run

    def edit_output(op: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            y = op(x)
            return y.mul_(1.0)
        return run

    grad, _ = guided_grad(edit_input(F.relu))
    torch.testing.assert_close(grad, guided_expected(float("inf")), rtol=0, atol=0)
    grad, _ = guided_grad(edit_output(F.relu6))
    torch.testing.assert_close(grad, guided_expected(6.0), rtol=0, atol=0)
    for breaks in (edit_output(F.relu), edit_input(F.relu6)):
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            guided_grad(breaks)


def test_other_clips_pass_through_and_are_counted_once_per_call() -> None:
    x = X.clone()
    with relu_rule(nn.Identity(), "guided") as state:
        a = F.hardtanh(x, -1.0, 6.0)  # not a rectifier: the lower bound is not 0
        b = F.hardtanh(x, 0.0, 0.0)  # clips everything to 0: no positive range
        c = F.hardtanh_(x.clone())  # defaults -1, 1
    torch.testing.assert_close(a, x.clamp(-1.0, 6.0), rtol=0, atol=0)
    torch.testing.assert_close(b, torch.zeros_like(x), rtol=0, atol=0)
    torch.testing.assert_close(c, x.clamp(-1.0, 1.0), rtol=0, atol=0)
    assert dict(state.unsupported) == {"Hardtanh": 3} and not state.rectifiers
    assert state.warnings() == (
        "guided rule not applied to 3 Hardtanh activations (no such rule for them; plain gradients pass through)",
    )


def test_counts_are_per_evaluation() -> None:
    with relu_rule(nn.Identity(), "deconvnet") as state:
        x = X.clone().requires_grad_(True)
        F.relu(F.relu(x) - 1.0)
        F.relu6(x)
    assert dict(state.rectifiers) == {"ReLU": 2, "ReLU6": 1} and state.rectified == 3


def test_integer_and_no_grad_rectifiers_run_as_called_without_a_rule() -> None:
    ints = torch.tensor([-3, 0, 2])
    floats = X.clone().requires_grad_(True)
    with relu_rule(nn.Identity(), "guided") as state:
        assert torch.equal(torch.relu(ints), torch.tensor([0, 0, 2]))
        F.relu(ints, inplace=True)  # the keyword reaches the op
        assert torch.equal(ints, torch.tensor([0, 0, 2]))
        with torch.no_grad():
            target = floats.detach().clone()
            out = F.relu(target, inplace=True)
    assert out.data_ptr() == target.data_ptr() and torch.equal(target, X.clamp_min(0))
    assert dict(state.rectifiers) == {"ReLU": 1}  # the float one counts (it ran); the integer one is not a rectifier


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_warning_texts() -> None:
    with relu_rule(nn.Identity(), "deconvnet") as state:
        torch.sigmoid(X)
    assert state.warnings() == ("no ReLU activation ran: the deconvnet result is the plain gradient",)

    class Net(nn.Module):
        def __init__(self, scripted: int) -> None:
            super().__init__()
            self.parts = nn.ModuleList([torch.jit.script(nn.ReLU()) for _ in range(scripted)])

    for scripted, text in ((1, "1 TorchScript submodule: "), (2, "2 TorchScript submodules: ")):
        with relu_rule(Net(scripted), "guided") as state:
            F.relu(X)
        assert state.warnings() == (
            text + "activations inside them cannot be seen, so the guided rule may be incomplete",
        )
