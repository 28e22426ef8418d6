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


def test_mixup_weight_is_drawn_from_the_epoch_generator_and_favours_the_own_labels():
    from medsight.train import epoch_generator, mixup_weight

    a = [mixup_weight(0.4, g) for g in [epoch_generator(3, 1)] for _ in range(200)]
    b = [mixup_weight(0.4, g) for g in [epoch_generator(3, 1)] for _ in range(200)]
    assert a == b  # same (seed, epoch): same weights, on every DDP rank
    assert all(0.5 <= w <= 1.0 for w in a)
    assert 0.6 < sum(a) / len(a) < 0.95  # Beta(0.4, 0.4) folded: mean about 0.8
    big = [mixup_weight(50.0, g) for g in [epoch_generator(0, 0)] for _ in range(200)]
    assert sum(big) / len(big) < 0.6  # large alpha: lam near 0.5


def test_training_with_mixup_is_reproducible_and_changes_the_weights(tmp_path):
    from medsight.config import load_config
    from medsight.pipeline import load_data_for
    from medsight.train import fit
    from tests.conftest import make_npz

    npz = make_npz(tmp_path / "t.npz", n=(24, 8, 8), shape=(12, 12))

    def weights(mixup):
        cfg = load_config(None, {"data.name": str(npz), "model.name": "simple_cnn", "train.epochs": 2,
                                 "train.batch_size": 8, "train.mixup": mixup, "train.device": "cpu"})
        return fit(cfg, load_data_for(cfg)).model.state_dict()

    m1, m2, plain = weights(0.4), weights(0.4), weights(0.0)
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    assert any(not torch.equal(m1[k], plain[k]) for k in m1 if m1[k].is_floating_point())
