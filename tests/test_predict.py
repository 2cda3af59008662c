"""convscope.methods.predict.classify: ranking, labels, top-k and batching, on a classifier whose
logits are known (kills the mutmut survivors of ``methods/predict.py``: ``tools/mutate.py predict``).

Each test names the mutant it kills. Tiny models keep them fast: mutmut runs them once per mutant.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convscope.errors import BadArgument
from convscope.methods.predict import classify
from convscope.models.load import wrap_model
from convscope.preprocess import Preprocess
from convscope.types import LoadedModel

CATEGORIES = [f"name {i}" for i in range(10)]


def _biased_classifier(outputs: int = 12) -> nn.Module:
    """Logits = bias = 0, 1, ..., outputs-1 for every image: class outputs-1 ranks first."""
    head = nn.Linear(3, outputs)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.arange(outputs, dtype=torch.float32))
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def _model(outputs: int = 12):
    # Built directly: wrap_model refuses a category list shorter than the outputs (issue 18), but
    # classify must still name the classes past the list of a model that was made that way.
    return LoadedModel(module=_biased_classifier(outputs).eval(), name="custom",
                       preprocess=Preprocess(resize=None, crop=8), categories=tuple(CATEGORIES))


def test_wrap_model_refuses_fewer_names_than_outputs() -> None:
    with pytest.raises(BadArgument, match="categories: has 10 names but custom has 12 outputs"):
        wrap_model(_biased_classifier(12), preprocess=Preprocess(resize=None, crop=8), categories=CATEGORIES)


def test_classify_refuses_topk_zero_naming_the_option() -> None:
    # kills predict mutants 1-10: `topk < 2`, `topk <= 1`, and a lost/changed subject or reason.
    with pytest.raises(BadArgument) as caught:
        classify(_model(), torch.zeros(1, 3, 8, 8), topk=0)
    assert str(caught.value) == "--topk: must be at least 1, got 0"


def test_classify_topk_one_is_the_argmax() -> None:
    # kills `topk < 2` / `topk <= 1` from the accepting side: k=1 must work.
    [prediction] = classify(_model(), torch.zeros(1, 3, 8, 8), topk=1)
    assert prediction.indices.tolist() == [11]


def test_classify_labels_past_the_category_list_are_class_numbers() -> None:
    # 12 outputs, 10 names: classes 11 and 10 rank first and have no name -> "class N";
    # kills `i <= len(categories)` (IndexError), `... or True` (IndexError), `... and False`
    # (name 9 would become "class 9").
    predictions = classify(_model(), torch.zeros(2, 3, 8, 8), topk=3)
    for prediction in predictions:
        assert prediction.labels == ("class 11", "class 10", "name 9")
        assert prediction.indices.tolist() == [11, 10, 9]


def test_classify_probabilities_are_the_softmax_over_classes_in_batches() -> None:
    # 5 images in chunks of 2 (2 + 2 + 1): every row is softmax(0..11) over the class axis.
    expected = torch.softmax(torch.arange(12, dtype=torch.float32), dim=0)
    predictions = classify(_model(), torch.randn(5, 3, 8, 8), topk=12, batch_size=2)
    assert len(predictions) == 5
    for prediction in predictions:
        torch.testing.assert_close(prediction.probabilities, expected.flip(0))
        assert float(prediction.probabilities.sum()) == pytest.approx(1.0)


def test_classify_clips_topk_to_the_number_of_classes() -> None:
    [prediction] = classify(_model(4), torch.zeros(1, 3, 8, 8), topk=50)
    assert prediction.indices.tolist() == [3, 2, 1, 0]


def test_classify_default_is_top5() -> None:
    # kills the mutant that changes the documented default `topk=5`.
    [prediction] = classify(_model(), torch.zeros(1, 3, 8, 8))
    assert prediction.indices.tolist() == [11, 10, 9, 8, 7]


def test_classify_top50_is_sorted(default_model, photo) -> None:
    # Found by the hand-made mutation round (issue 14): a k large enough for the order to matter.
    prediction = classify(default_model, photo, topk=50)[0]
    probabilities = prediction.probabilities
    assert probabilities.shape == (50,)
    assert bool((probabilities[:-1] >= probabilities[1:]).all()), probabilities
    # and the ranking is the full softmax's
    with torch.no_grad():
        logits = default_model.module(default_model.preprocess.to_tensor(photo).to(default_model.device))
    assert prediction.indices.tolist() == logits[0].argsort(descending=True)[:50].tolist()
