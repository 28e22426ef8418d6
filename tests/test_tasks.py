import numpy as np
import pytest
import torch

from medsight.errors import ConfigError
from medsight.tasks import Task


def test_binary():
    t = Task("binary", 2)
    assert t.num_outputs == 1
    logits = torch.tensor([[2.0], [-2.0]])
    y = t.targets(np.array([[1], [0]]))
    assert float(t.loss(logits, y)) < 0.2
    p = t.probabilities(logits).numpy()
    assert p.shape == (2,) and p[0] > 0.5 > p[1]
    assert t.decide(p).tolist() == [1, 0]
    assert t.decide(p, threshold=0.95).tolist() == [0, 0]
    w = t.class_weights(np.array([0, 1, 1, 1]))
    assert w[0] > w[1]


def test_multiclass_and_multilabel():
    mc = Task("multiclass", 3)
    p = mc.probabilities(torch.tensor([[0.0, 5.0, 0.0]])).numpy()
    assert np.isclose(p.sum(), 1) and mc.decide(p).tolist() == [1]
    ml = Task("multilabel", 3)
    y = ml.targets(np.array([[1, 0, 1]]))
    assert y.dtype == torch.float32 and y.shape == (1, 3)
    pl = ml.probabilities(torch.tensor([[5.0, -5.0, 5.0]])).numpy()
    assert ml.decide(pl).tolist() == [[1, 0, 1]]
    assert float(ml.loss(torch.tensor([[5.0, -5.0, 5.0]]), y)) < 0.05


def test_ordinal_probabilities_and_decision():
    t = Task("ordinal", 4)
    assert t.num_outputs == 3
    logits = torch.tensor([[9.0, 9.0, -9.0], [-9.0, -9.0, -9.0]])
    p = t.probabilities(logits).numpy()
    assert np.allclose(p.sum(1), 1) and (p >= 0).all()
    assert t.decide(p).tolist() == [2, 0]
    y = torch.tensor([2, 0])
    assert float(t.loss(logits, y)) < 0.01
    assert float(t.loss(logits, torch.tensor([0, 3]))) > 1


@pytest.mark.parametrize("name,k", [("regression", 2), ("binary", 3), ("multiclass", 1)])
def test_invalid_tasks(name, k):
    with pytest.raises(ConfigError):
        Task(name, k)
