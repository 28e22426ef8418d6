import torch

from medsight.config import AugmentConfig
from medsight.augment import BatchAugment, resize
from medsight.inference import to_float


def test_to_float_scales_uint8():
    x = torch.tensor([[0, 255]], dtype=torch.uint8)
    assert to_float(x).tolist() == [[0.0, 1.0]]


def test_identity_params_leave_image_unchanged():
    cfg = AugmentConfig(enabled=True, rotate=0, scale=0, translate=0, flip=[], brightness=0, contrast=0, noise=0)
    aug = BatchAugment(cfg, 2)
    x = torch.rand(4, 1, 16, 16)
    y = aug(x.clone(), torch.Generator().manual_seed(0))
    assert torch.allclose(x, y, atol=1e-5)


def test_flip_only_flips_the_configured_axis():
    cfg = AugmentConfig(rotate=0, scale=0, translate=0, flip=[1], brightness=0, contrast=0, noise=0)
    aug = BatchAugment(cfg, 2)
    x = torch.rand(1, 1, 8, 8)
    p = aug.sample(1, torch.Generator().manual_seed(0))
    p["flip"][:] = torch.tensor([[True, False]])
    y = aug.apply(x.clone(), p)
    assert torch.allclose(y, x.flip(-2), atol=1e-5)  # axis 1 = rows (H)


def test_augment_is_reproducible_and_in_range_2d_3d():
    for dims in (2, 3):
        aug = BatchAugment(AugmentConfig(enabled=True, rotate=20, gamma=0.2), dims)
        x = torch.rand(3, 1, *(12,) * dims)
        a = aug(x.clone(), torch.Generator().manual_seed(5))
        b = aug(x.clone(), torch.Generator().manual_seed(5))
        assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1 and a.shape == x.shape
        assert not torch.allclose(a, x)


def test_resize():
    assert resize(torch.rand(2, 1, 28, 28), (14, 14)).shape == (2, 1, 14, 14)
    assert resize(torch.rand(2, 1, 8, 8, 8), (16, 16, 16)).shape == (2, 1, 16, 16, 16)
