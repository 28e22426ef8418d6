import numpy as np
import pytest

from medsight.errors import DataError
from medsight.data.preprocess import apply_recipe, make_recipe

R = make_recipe(size=(28, 28), channels=1, intensity="range", value_range=(0, 255))


def test_uint8_range_matches_training_scaling():
    x = np.random.default_rng(0).integers(0, 256, (1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(apply_recipe(x, {}, R), x / 255, atol=1e-6)


def test_rgb_to_gray_resize_and_window():
    rgb = np.full((3, 56, 56), 255.0, np.float32)
    out = apply_recipe(rgb, {}, R)
    assert out.shape == (1, 28, 28) and np.allclose(out, 1.0)
    ct = np.linspace(-1000, 1000, 28 * 28, dtype=np.float32).reshape(1, 28, 28)
    w = apply_recipe(ct, {}, make_recipe(size=(28, 28), window=(40, 400)))
    assert w.min() == 0 and w.max() == 1


@pytest.mark.parametrize("bad", [np.zeros((1, 2, 3, 4, 5)), np.full((1, 28, 28), np.nan), np.zeros((2, 28, 28))])
def test_bad_arrays(bad):
    with pytest.raises(DataError, match="x.png"):
        apply_recipe(bad, {}, R, name="x.png")


@pytest.mark.parametrize("kw", [{"intensity": "range"}, {"intensity": "sparkly"}, {"window": "purple"},
                                {"size": (0, 28)}])
def test_bad_recipes(kw):
    with pytest.raises(DataError):
        make_recipe(**{"size": (28, 28), **kw})
