"""capture(), reduce_outputs(), trace_calls() and eval_mode(): cleanup on exit and on error, reused modules,
in-place ReLU."""

from __future__ import annotations

import pytest
import torch

from convscope.probes.hooks import capture, eval_mode, reduce_outputs, trace_calls


def test_capture_records_every_call_of_a_reused_module(tiny_cnn, assert_no_side_effects) -> None:
    x = torch.randn(2, 3, 16, 16)

    def run():
        with torch.no_grad(), capture(tiny_cnn, {"relu": tiny_cnn.relu, "conv2": tiny_cnn.conv2}) as store:
            tiny_cnn(x)
        return store

    store = assert_no_side_effects(tiny_cnn, run)
    assert len(store.outputs["relu"]) == 2  # the same ReLU module runs twice per forward
    first, second = store.outputs["relu"]
    with torch.no_grad():
        expected_first = torch.relu(tiny_cnn.conv1(x))
        expected_second = torch.relu(tiny_cnn.conv2(expected_first))
    torch.testing.assert_close(first, expected_first)
    torch.testing.assert_close(second, expected_second)


def test_clone_protects_against_inplace_relu(tiny_cnn) -> None:
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad(), capture(tiny_cnn, {"conv1": tiny_cnn.conv1}) as store:
        tiny_cnn(x)
        expected = tiny_cnn.conv1(x)
    # The in-place ReLU after conv1 would have zeroed negatives in an uncloned tensor.
    assert (store.last("conv1") < 0).any()
    torch.testing.assert_close(store.last("conv1"), expected)


def test_graph_mode_gives_the_true_gradient_despite_inplace_relu(tiny_cnn) -> None:
    x = torch.randn(1, 3, 16, 16)
    with capture(tiny_cnn, {"conv1": tiny_cnn.conv1}, mode="graph") as store:
        score = tiny_cnn(x)[0, 1]
    grad_ours = torch.autograd.grad(score, store.last("conv1"))[0]
    # Reference: split the network by hand at conv1's output.
    a = tiny_cnn.conv1(x).detach().requires_grad_(True)
    h = torch.relu(a)
    h = tiny_cnn.pool(torch.relu(tiny_cnn.conv2(h)))
    ref = tiny_cnn.fc(torch.flatten(h, 1))[0, 1]
    grad_ref = torch.autograd.grad(ref, a)[0]
    torch.testing.assert_close(grad_ours, grad_ref)
    assert (store.last("conv1") < 0).any()  # not overwritten by the in-place ReLU


def test_hooks_removed_when_the_block_raises(tiny_cnn, assert_no_side_effects) -> None:
    def run():
        with capture(tiny_cnn, {"conv1": tiny_cnn.conv1}):
            tiny_cnn(torch.randn(1, 3, 16, 16))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        assert_no_side_effects(tiny_cnn, run)


def test_hooks_removed_when_the_model_raises(tiny_cnn) -> None:
    with pytest.raises(RuntimeError), capture(tiny_cnn, {"conv1": tiny_cnn.conv1}):
        tiny_cnn(torch.randn(1, 5, 16, 16))  # wrong channel count
    assert not tiny_cnn.conv1._forward_hooks


def test_eval_mode_restores_each_flag(tiny_cnn) -> None:
    tiny_cnn.train()
    tiny_cnn.conv2.eval()  # a mixed state must come back exactly
    with eval_mode(tiny_cnn):
        assert not any(m.training for m in tiny_cnn.modules())
    assert tiny_cnn.training and tiny_cnn.conv1.training and not tiny_cnn.conv2.training
    with pytest.raises(ValueError), eval_mode(tiny_cnn):
        raise ValueError("x")
    assert tiny_cnn.training and not tiny_cnn.conv2.training


def test_last_raises_for_a_layer_that_did_not_run(tiny_cnn) -> None:
    with capture(tiny_cnn, {"fc": tiny_cnn.fc}) as store:
        pass
    with pytest.raises(RuntimeError, match="'fc' was not called"):
        store.last("fc")


def test_capture_refuses_a_module_of_another_network(tiny_cnn) -> None:
    from torch import nn

    stranger = nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match="capture: other not part of the model"), \
            capture(tiny_cnn, {"other": stranger}):
        pass
    assert not stranger._forward_hooks


def test_reduce_outputs_sees_each_call_before_the_inplace_relu(tiny_cnn, assert_no_side_effects) -> None:
    x = torch.randn(2, 3, 16, 16)

    def run():
        with torch.no_grad(), reduce_outputs(
            tiny_cnn, {"conv1": tiny_cnn.conv1, "relu": tiny_cnn.relu}, lambda name, out: (name, out.amin(), out.sum())
        ) as found:
            tiny_cnn(x)
        return found

    found = assert_no_side_effects(tiny_cnn, run)
    with torch.no_grad():
        conv1 = tiny_cnn.conv1(x)
        second = torch.relu(tiny_cnn.conv2(torch.relu(conv1)))
    ((name, low, total),) = found.outputs["conv1"]
    assert name == "conv1"
    # The in-place ReLU right after conv1 runs after the hook: the reduction saw the negatives.
    assert low < 0 and low == conv1.amin()
    torch.testing.assert_close(total, conv1.sum())
    assert [n for n, _, _ in found.outputs["relu"]] == ["relu", "relu"]  # both calls of the reused ReLU
    torch.testing.assert_close(found.outputs["relu"][1][2], second.sum())


def test_reduce_outputs_cleans_up_and_refuses_strangers(tiny_cnn) -> None:
    from torch import nn

    with pytest.raises(RuntimeError), reduce_outputs(tiny_cnn, {"conv1": tiny_cnn.conv1}, lambda n, o: o.sum()):
        tiny_cnn(torch.randn(1, 5, 16, 16))  # wrong channel count
    assert not tiny_cnn.conv1._forward_hooks
    stranger = nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match="reduce_outputs: other not part of the model"), \
            reduce_outputs(tiny_cnn, {"other": stranger}, lambda n, o: o):
        pass
    assert not stranger._forward_hooks


def test_trace_calls_records_the_call_tree_with_versions(tiny_cnn, assert_no_side_effects) -> None:
    x = torch.randn(1, 3, 16, 16)
    returned: list[str] = []

    def run():
        with torch.no_grad(), trace_calls(tiny_cnn, on_return=lambda call: returned.append(call.path)) as traced:
            tiny_cnn(x)
        return traced

    traced = assert_no_side_effects(tiny_cnn, run)
    (root,) = traced.roots
    assert root.path == "" and root.input is x and root.output_shape == (1, 5)
    # every call, the reused in-place ReLU twice, in call order under the root
    assert [c.path for c in root.children] == ["conv1", "relu", "conv2", "relu", "pool", "fc"]
    assert [c.path for c in traced.calls] == ["conv1", "relu", "conv2", "relu", "pool", "fc", ""] == returned
    conv1, relu = root.children[:2]
    # the in-place ReLU reads conv1's output and returns the same tensor, one version later
    assert relu.input is conv1.output and relu.input_version == conv1.output_version
    assert relu.output is conv1.output and relu.output_version == conv1.output_version + 1
    assert relu.parent is root and relu.input_shape == relu.output_shape == (1, 4, 16, 16)


def test_trace_calls_leaves_only_without_tensors_and_in_inference_mode(tiny_cnn) -> None:
    started: list[tuple[str, bool]] = []
    with torch.inference_mode(), trace_calls(
        tiny_cnn, leaves_only=True, keep_tensors=False, on_call=lambda c: started.append((c.path, c.input is not None))
    ) as traced:
        tiny_cnn(torch.randn(1, 3, 16, 16))
    assert [c.path for c in traced.roots] == ["conv1", "relu", "conv2", "relu", "pool", "fc"]
    assert all(path and seen for path, seen in started)  # the input is there while the call runs
    assert all(c.input is None and c.output is None for c in traced.calls)  # and dropped after
    assert traced.calls[-1].output_shape == (1, 5)
    assert {c.input_version for c in traced.calls} == {-1}  # inference tensors have no version counter


def test_trace_calls_removes_its_hooks_when_the_model_raises(tiny_cnn, assert_no_side_effects) -> None:
    def run():
        with trace_calls(tiny_cnn):
            tiny_cnn(torch.randn(1, 3, 15, 15))  # the flattened size does not fit fc

    with pytest.raises(RuntimeError):
        assert_no_side_effects(tiny_cnn, run)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_cnn.modules()) == 0
