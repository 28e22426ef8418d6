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


# --- the kind registry: one place per task kind --------------------------------------------------------------------

def test_unknown_task_kind_is_one_line_listing_the_known_ones():
    from medsight.tasks import TASK_TYPES, kind_of

    with pytest.raises(ConfigError, match="unknown task 'segmentation'; allowed: binary, multiclass") as e:
        kind_of("segmentation")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown task"):
        Task("regression", 2)
    assert TASK_TYPES == ("binary", "multiclass", "multilabel", "ordinal")


@pytest.mark.parametrize("name, k", [("binary", 2), ("multiclass", 3), ("multilabel", 3), ("ordinal", 4)])
def test_every_kind_answers_the_consumers_questions(name, k):
    """Metrics, calibration, summary and report ask these; each kind answers with its own shapes."""
    from medsight import metrics as M
    from medsight.calibration import nll

    t = Task(name, k)
    rng = np.random.default_rng(0)
    logits = torch.as_tensor(rng.normal(size=(40, t.num_outputs)), dtype=torch.float32)
    y = (rng.integers(0, 2, size=(40, k)) if t.kind.indicator_labels else rng.integers(0, k, size=40))
    if name == "binary":
        y = rng.integers(0, 2, size=40)
    p = t.probabilities(logits).numpy()
    m = M.compute_metrics(name, y, p)
    assert set(t.kind.metric_names) <= set(m) and t.kind.metric_names[:9] == M.BASE_METRICS
    assert np.isfinite(nll(t, logits.numpy(), y))
    counts = t.kind.class_counts(y, [str(i) for i in range(k)])
    assert len(counts) == k and sum(counts.values()) == (int(np.asarray(y).sum()) if t.kind.indicator_labels else 40)
    assert len(t.kind.one_vs_rest(np.asarray(y), p, [str(i) for i in range(k)])) == (1 if name == "binary" else k)
    assert t.class_table(p).shape == (40, k)
    assert t.positive_class([str(i) for i in range(k)]) == ("1" if name == "binary" else None)
    assert t.as_threshold(0.3) == ({"binary": 0.3, "multilabel": [0.3]}.get(name))


def test_stored_thresholds_are_checked_by_the_kind():
    Task("binary", 2).check_threshold(0.4)
    Task("multilabel", 3).check_threshold([0.1, 0.2, 0.3])
    for task, thr in ((Task("binary", 2), [0.1, 0.2]), (Task("binary", 2), 1.5), (Task("multiclass", 3), 0.5),
                      (Task("multilabel", 3), [0.1, 0.2])):
        with pytest.raises(ConfigError, match="threshold"):
            task.check_threshold(thr)


def test_a_new_kind_is_one_class_registered_in_tasks(monkeypatch):
    """The seam: a kind registered in ``tasks.KINDS`` is understood by Task, metrics, summary and config without an
    edit to them (here a toy kind that decides by argmax over its classes)."""
    from medsight import metrics as M
    from medsight import tasks
    from medsight.config import DataConfig
    from medsight.summary import class_counts, split_line

    class ToyKind(tasks.MulticlassKind):
        name = "toy"
        extra_metrics = ("mae",)

        def batch_metrics(self, yb, pb, k, thr):
            return tasks.S.multiclass_batch(yb, pb, k, ordinal=True)

    monkeypatch.setitem(tasks.KINDS, "toy", ToyKind())
    t = Task("toy", 3)
    assert t.num_outputs == 3 and not t.uses_threshold
    y = np.array([0, 1, 2, 2])
    p = np.eye(3)[[0, 1, 2, 1]]
    m = M.compute_metrics("toy", y, p)
    assert m["accuracy"] == 0.75 and m["mae"] == 0.25 and "qwk" not in m
    assert class_counts("toy", y, ["a", "b", "c"]) == {"a": 1, "b": 1, "c": 2}
    assert split_line("toy", "test", y, ["a", "b", "c"]).startswith("test: 4 images (a 1")
    assert DataConfig(task="toy").task == "toy"
