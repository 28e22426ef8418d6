"""OOD scores: formulas, threshold on validation, the combined detector (features + input statistics + pixel
PPCA), persistence and refusal of malformed files, error paths, and on real data: a PneumoniaMNIST model flags
BreastMNIST, a BreastMNIST model flags PneumoniaMNIST chest X-rays, noise and blank images."""

import functools
import io
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

import ood_baselines as base
from beyond_helpers import pneumonia, pneumonia_model, root_of
from medsight import ood
from medsight.errors import ConfigError, DataError, MedsightError


def test_energy_binary_uses_two_class_logits():
    z = torch.tensor([[-3.0], [0.0], [4.0]])
    expect = -torch.logsumexp(torch.cat([torch.zeros_like(z), z], 1), 1).numpy()
    np.testing.assert_allclose(base.energy_score(z), expect, rtol=1e-6)
    np.testing.assert_allclose(base.energy_score(z.reshape(-1)), expect, rtol=1e-6)  # (N,) accepted
    # confident predictions (large |z| with z > 0) have lower energy = less OOD
    assert base.energy_score(z)[2] < base.energy_score(z)[1]


def test_energy_multiclass_and_temperature():
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(base.energy_score(z), -torch.logsumexp(z, 1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(base.energy_score(z, 2.0), -2 * torch.logsumexp(z / 2, 1).numpy(), rtol=1e-6)
    # multilabel: per-output two-class energies, summed
    per = base.energy_score(z, task="multilabel")
    np.testing.assert_allclose(per, sum(base.energy_score(z[:, k:k + 1]) for k in range(3)), rtol=1e-6)


@pytest.mark.parametrize("call, error, message", [
    (lambda z: base.energy_score(z, 0), ConfigError, "temperature must be > 0"),
    (lambda z: base.energy_score(z, task="survival"), ConfigError, "unknown task 'survival'"),
    (lambda z: base.energy_score(torch.zeros(2, 2, 2)), DataError, "logits must have shape"),
], ids=["temperature", "task", "shape"])
def test_energy_refusals(call, error, message):
    with pytest.raises(error, match=message):
        call(torch.zeros(2, 3))


def test_msp():
    z = torch.tensor([[10.0, 0.0], [0.0, 0.0]])
    s = base.msp_score(z)
    assert s[0] < 1e-3 and s[1] == pytest.approx(0.5)
    assert base.msp_score(torch.tensor([[0.0]]))[0] == pytest.approx(0.5)


def test_threshold_and_flags():
    s = np.arange(101, dtype=float)
    assert base.fit_ood_threshold(s, 0.95) == pytest.approx(95.0)
    assert ood.ood_flags([94, 95, 96], 95.0).tolist() == [False, False, True]


@pytest.mark.parametrize("call, error, message", [
    (lambda: base.fit_ood_threshold(np.arange(101.0), 1.0), ConfigError, r"quantile must be in \(0, 1\)"),
    (lambda: base.fit_ood_threshold([], 0.9), DataError, "no validation scores"),
    (lambda: base.fit_ood_threshold([1.0, float("nan")]), DataError, "NaN"),
    (lambda: ood.ood_flags([1.0], None), ConfigError, "threshold must be a finite number"),
    (lambda: ood.ood_flags([1.0], float("inf")), ConfigError, "threshold must be a finite number"),
], ids=["quantile", "empty", "nan", "no-threshold", "inf-threshold"])
def test_threshold_and_flag_refusals(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_mahalanobis_formula_on_known_gaussians():
    state = {"means": np.array([[0.0, 0.0], [10.0, 0.0]]), "precision": np.diag([1.0, 0.25])}
    d = ood.mahalanobis_from_features(np.array([[0.0, 2.0], [9.0, 0.0], [5.0, 0.0]]), state)
    np.testing.assert_allclose(d, [1.0, 1.0, 25.0])
    with pytest.raises(DataError, match="do not match the fitted Mahalanobis state"):
        ood.mahalanobis_from_features(np.zeros((2, 3)), state)


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))


def test_mahalanobis_state_hooks_the_last_linear():
    m = _tiny()
    x = torch.rand(30, 1, 4, 4)
    y = np.arange(30) % 2
    st = base.fit_mahalanobis(m, x, y)
    assert st["layer"] == "3" and st["means"].shape == (2, 8) and st["precision"].shape == (8, 8)
    assert st["classes"].tolist() == [0, 1]
    one = base.fit_mahalanobis(m, x, None)
    assert one["means"].shape == (1, 8)
    multi = base.fit_mahalanobis(m, x, np.eye(3)[np.arange(30) % 3])  # multilabel -> class-agnostic
    assert multi["means"].shape == (1, 8)
    s = base.mahalanobis_scores(m, x, st)
    assert s.shape == (30,) and np.isfinite(s).all()
    det = ood.fit_ood_detector(m, x[:20], y[:20], x[20:])  # the product's features component is the same state
    np.testing.assert_allclose(det["means"], base.fit_mahalanobis(m, x[:20], y[:20])["means"])


_X, _Y = torch.rand(30, 1, 4, 4), np.arange(30) % 2


@pytest.mark.parametrize("call, error, message", [
    (lambda m: ood.mahalanobis_state(np.zeros((30, 8)), _Y[:-1]), DataError, "30 images but 29 labels"),
    (lambda m: ood.mahalanobis_state(np.zeros((1, 8)), _Y[:1]), DataError, "at least 2 training images"),
    (lambda m: ood.mahalanobis_state(np.zeros(8)), DataError, r"features must have shape \(N, D\)"),
    (lambda m: ood.fit_ood_detector(nn.Sequential(nn.Conv2d(1, 1, 3)), _X, _Y, _X), ConfigError,
     "has no final nn.Linear"),
    (lambda m: ood.logits_and_features(m, _X, layer="fc"), ConfigError, "no layer 'fc'"),
    (lambda m: ood.logits_and_features(m, _X, batch_size=0), ConfigError, "batch_size"),
    (lambda m: ood.logits_and_features(m, _X[:0]), DataError, "no images"),
], ids=["labels", "too-few", "feature-shape", "no-linear", "no-layer", "batch-size", "no-images"])
def test_feature_refusals(call, error, message):
    with pytest.raises(error, match=message):
        call(_tiny())


def test_detector_persistence(tmp_path):
    m = _tiny()
    x = torch.rand(40, 1, 4, 4)
    y = np.arange(40) % 2
    det = ood.fit_ood_detector(m, x[:30], y[:30], x[30:])
    assert det["score"] == "combined" and det["format"] == ood.FORMAT_COMBINED
    ref = ood.detect(m, x, det)
    p = ood.save_ood(tmp_path / "ood.npz", det)
    back = ood.load_ood(p)
    np.testing.assert_allclose(ood.detect(m, x, back)["ood_score"], ref["ood_score"])
    js = json.loads(json.dumps(ood.detector_to_json(det)))  # bundle.json-compatible
    np.testing.assert_allclose(ood.detect(m, x, ood.detector_from_json(js))["ood_score"], ref["ood_score"])
    assert ref["ood_flag"].dtype == bool and ref["logits"].shape == (40, 1)


@pytest.mark.parametrize("obj, message", [
    ({"score": "combined"}, "not an OOD detector"),
    ({"format": "medsight-ood/2", "score": "x"}, "unknown OOD score in detector"),
], ids=["no-format", "unknown-score"])
def test_detector_from_json_refusals(obj, message):
    with pytest.raises(DataError, match=message):
        ood.detector_from_json(obj)


def test_missing_or_unreadable_ood_npz_is_one_line(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ood.load_ood(tmp_path / "none.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read OOD detector"):
        ood.load_ood(tmp_path / "bad.npz")


@pytest.mark.parametrize("score", ["mahalanobis", "energy", "msp"])
def test_a_retired_single_score_detector_is_refused_in_one_line(tmp_path, score):
    """ood.npz files of the single-score detectors (format medsight-ood/1) name the file and say what to do."""
    m = _tiny()
    x = torch.rand(30, 1, 4, 4)
    old = {"format": ood.RETIRED_FORMAT, "score": score, "quantile": 0.95, "temperature": 1.0, "task": "binary",
           "threshold": 1.5}
    if score == "mahalanobis":
        old.update(base.fit_mahalanobis(m, x, np.arange(30) % 2))
    p = ood.save_ood(tmp_path / "ood.npz", old)
    with pytest.raises(DataError, match=rf"OOD detector {p} is a single-score detector \(medsight-ood/1, "
                                        rf"'{score}'\).*retrain the bundle") as e:
        ood.load_ood(p)
    assert "\n" not in str(e.value)


def test_pneumonia_model_flags_breast_ultrasound(medmnist_dir):
    from medsight.data.sources import load_medmnist

    root = root_of(medmnist_dir)
    model, data = pneumonia_model(root), pneumonia(root)
    breast = load_medmnist("breastmnist", 28, root=root, download_missing=False)
    tr = data.splits["train"]
    det = ood.fit_ood_detector(model, tr.images, tr.labels, data.splits["val"].images)  # TRAIN fit, VAL threshold
    ind = ood.detect(model, data.splits["test"].images, det)
    out = ood.detect(model, breast.splits["test"].images, det)
    y = np.r_[np.zeros(len(ind["ood_score"])), np.ones(len(out["ood_score"]))]
    auroc = roc_auc_score(y, np.r_[ind["ood_score"], out["ood_score"]])
    assert auroc >= 0.95, auroc
    assert ind["ood_flag"].mean() < 0.15  # ~5 % false alarms by construction (95th percentile of val)
    assert out["ood_flag"].mean() > 0.9
    # the logit-based scores are much weaker here, which is why the detector scores features and inputs
    z_in, z_out = ind["logits"], out["logits"]
    energy_auroc = roc_auc_score(y, np.r_[base.energy_score(z_in), base.energy_score(z_out)])
    assert energy_auroc < auroc


def test_with_features_gives_logits_and_the_mahalanobis_features():
    m = _tiny().eval()
    x = torch.rand(5, 1, 4, 4)
    logits, feats = ood.WithFeatures(m)(x)
    ref_logits, ref_feats = ood.logits_and_features(m, x)
    assert torch.allclose(logits, ref_logits) and torch.allclose(feats, ref_feats)
    with pytest.raises(ConfigError, match="no layer 'head'"):
        ood.WithFeatures(m, layer="head")


# --------------------------------------------------------------------------------------------- input components
def test_input_statistics_known_values_and_uint8_equals_float():
    x = np.zeros((2, 1, 8, 8), np.float32)
    x[1, :, :, 4:] = 1.0  # left half black, right half white
    s = ood.input_statistics(x)
    assert s.shape == (2, ood.n_input_statistics(2))
    hist = s[:, :16] ** 2  # square-root histogram
    np.testing.assert_allclose(hist[0], np.eye(16)[0])
    np.testing.assert_allclose(hist[1], 0.5 * (np.eye(16)[0] + np.eye(16)[15]))
    assert s[0, 16] == 0 and s[1, 16] == pytest.approx(0.5)  # mean
    assert s[0, 17] == pytest.approx(np.log(1e-3)) and s[1, 17] == pytest.approx(np.log(0.5 + 1e-3))  # log std
    # mean |gradient| per axis: none down the rows; one step of 1 in 7 differences across the columns
    np.testing.assert_allclose(s[1, 21:23], np.log(np.array([0.0, 1 / 7]) + 1e-4))
    # the column profile goes from black to white, the row profile stays at 0.5
    assert s[1, -7] == 0 and s[1, -1] == 1 and np.allclose(s[1, -14:-7], 0.5)
    u8 = np.random.default_rng(0).integers(0, 256, (3, 1, 12, 12)).astype(np.uint8)
    np.testing.assert_allclose(ood.input_statistics(u8), ood.input_statistics(u8.astype(np.float32) / 255))
    assert ood.input_statistics(np.zeros((2, 1, 6, 6, 6))).shape == (2, ood.n_input_statistics(3))
    with pytest.raises(DataError, match=r"must have shape \(N, C, H, W\)"):
        ood.input_statistics(np.zeros((2, 8, 8)))


def test_downsample_is_the_area_mean():
    x = np.random.default_rng(0).random((3, 1, 28, 28))
    blocks = x[:, 0].reshape(3, 14, 2, 14, 2).mean(axis=(2, 4)).reshape(3, -1)
    np.testing.assert_allclose(ood.downsample(x, [14, 14]), blocks)
    m = ood._area_matrix(28, 16)
    np.testing.assert_allclose(m.sum(axis=1), 1.0)  # uneven cells still average
    np.testing.assert_allclose(ood.downsample(np.full((1, 3, 28, 28), 0.25), [16, 16]), 0.25)
    assert ood.pixel_grid((28, 28)) == [16, 16] and ood.pixel_grid((28, 28, 28)) == [8, 8, 8]
    assert ood.pixel_grid((10, 12)) == [10, 12]


def test_calibrate_thresholds_counts_false_alarms_conservatively():
    q, t = ood.calibrate_thresholds({"a": np.arange(100.0)}, 0.05)
    # (flagged + 1) / (n + 1) <= 5 %: 4 of 100 validation scores may exceed, not 5
    assert int((np.arange(100.0) > t["a"]).sum()) == 4 and q == pytest.approx(0.96)
    # two components with different outliers: the union is what is limited
    a, b = np.zeros(200), np.zeros(200)
    a[:10], b[10:20] = np.arange(1, 11), np.arange(1, 11)
    a[20:], b[20:] = np.linspace(0, 0.5, 180), np.linspace(0, 0.5, 180)
    q, t = ood.calibrate_thresholds({"a": a, "b": b}, 0.04)
    assert ((a > t["a"]) | (b > t["b"])).sum() + 1 <= 0.04 * 201
    # pooled extra scores set that component's threshold at q; a validation-only component beside it is set at
    # the stricter 1 - (1 - q) / K
    val = np.arange(100.0)
    q2, t2 = ood.calibrate_thresholds({"a": val, "f": val}, 0.05, extra={"a": np.zeros(900)})
    pool = np.concatenate([val, np.zeros(900)])
    assert t2["a"] == pytest.approx(np.quantile(pool, q2))
    assert t2["f"] == pytest.approx(np.quantile(val, 1 - (1 - q2) / 2)) and t2["f"] >= np.quantile(val, q2)
    with pytest.raises(ConfigError, match=r"false_alarm must be in \(0, 1\)"):
        ood.calibrate_thresholds({"a": np.arange(10.0)}, 0)
    with pytest.raises(DataError, match="NaN"):
        ood.calibrate_thresholds({"a": np.array([1.0, np.nan])})
    with pytest.raises(DataError, match="no validation scores"):
        ood.calibrate_thresholds({"a": np.array([])})


def _smooth_images(n, seed, size=16):
    """In-distribution toy images: a bright blob at a random place on a dark background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    c = rng.uniform(size / 4, size * 3 / 4, (n, 2))
    img = np.exp(-((yy - c[:, :1, None]) ** 2 + (xx - c[:, 1:, None]) ** 2) / 8.0)
    return (0.1 + 0.8 * img + 0.02 * rng.standard_normal((n, size, size))).clip(0, 1)[:, None].astype(np.float32)


@functools.cache
def _toy_detector():
    rng = np.random.default_rng(0)
    xtr, xva = _smooth_images(200, 1), _smooth_images(80, 2)
    ftr, fva = rng.standard_normal((200, 6)), rng.standard_normal((80, 6))
    return ood.fit_combined_detector(ftr, np.arange(200) % 2, xtr, fva, xva, layer="fc"), fva, xva


def test_combined_detector_flags_noise_and_blanks_from_arrays():
    det, fva, xva = _toy_detector()
    assert det["score"] == "combined" and det["threshold"] == 1.0 and det["format"] == ood.FORMAT_COMBINED
    assert sorted(det["thresholds"]) == sorted(ood.COMPONENTS) and 0.96 <= det["quantile"] <= 1
    val = ood.score_from_outputs(None, fva, det, x=xva)
    assert (val > 1).mean() <= 0.03
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((20, 6))  # features look normal: only the inputs give these away
    for x in (np.zeros((20, 1, 16, 16)), np.ones((20, 1, 16, 16)), rng.random((20, 1, 16, 16))):
        comps = ood.component_scores(feats, x, det)
        s = ood.combined_score(comps, det["thresholds"])
        assert (s > 1).all()
        assert (s == np.max([comps[k] / det["thresholds"][k] for k in comps], axis=0)).all()
    with pytest.raises(ConfigError, match="pass the preprocessed batch as x"):
        ood.score_from_outputs(None, feats, det)
    with pytest.raises(DataError, match=r"model inputs of shape \(1, 8, 8\) do not match"):
        ood.score_from_outputs(None, feats, det, x=np.zeros((20, 1, 8, 8)))
    with pytest.raises(ConfigError, match="OOD components must be distinct names"):
        ood.fit_combined_detector(fva, None, xva, fva, xva, components=["features", "texture"])
    only_inputs = ood.fit_combined_detector(None, None, _smooth_images(40, 5), None, xva,
                                            components=["intensity", "pixels"])
    assert "means" not in only_inputs
    assert (ood.score_from_outputs(None, None, only_inputs, x=np.ones((2, 1, 16, 16))) > 1).all()


def test_combined_detector_round_trips_through_ood_npz(tmp_path):
    det, fva, xva = _toy_detector()
    p = ood.save_ood(tmp_path / "ood.npz", det)
    with np.load(p, allow_pickle=False) as z:  # no pickled objects in the file
        assert {"meta", "means", "precision", "stat_mean", "pix_components"} <= set(z.files)
    back = ood.load_ood(p)
    assert back.keys() == det.keys()
    for k, v in det.items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(back[k], v)
        else:
            assert back[k] == v, k
    x = np.concatenate([xva[:5], np.zeros((2, 1, 16, 16), np.float32)])
    f = np.random.default_rng(4).standard_normal((7, 6))
    np.testing.assert_array_equal(ood.score_from_outputs(None, f, back, x=x), ood.score_from_outputs(None, f, det, x=x))
    js = json.loads(json.dumps(ood.detector_to_json(det)))  # bundle.json-compatible
    np.testing.assert_allclose(ood.score_from_outputs(None, f, ood.detector_from_json(js), x=x),
                               ood.score_from_outputs(None, f, det, x=x))


def _rewrite(path, det_arrays: dict, meta) -> None:
    buf = io.BytesIO()
    np.savez(buf, meta=np.array(meta if isinstance(meta, str) else json.dumps(meta)), **det_arrays)
    path.write_bytes(buf.getvalue())


@pytest.mark.parametrize("change, message", [
    (lambda a, m: m["thresholds"].pop("pixels"), "is malformed: thresholds must give a positive number"),
    (lambda a, m: m["thresholds"].update(features=-1.0), "is malformed: thresholds must give a positive number"),
    (lambda a, m: m.update(threshold=None), "is malformed: threshold must be a finite number"),
    (lambda a, m: a.update(pix_components=a["pix_components"][:, :-1]), "the pixels component needs pix_mean"),
    (lambda a, m: a.update(stat_precision=a["stat_precision"][:-1]), "the intensity component needs stat_mean"),
    (lambda a, m: a.pop("means"), "the features component needs 'means'"),
    (lambda a, m: a.update(means=np.full_like(a["means"], np.nan)), "means contains NaN or infinite values"),
    (lambda a, m: a.update(means=np.array(["a", "b"])), "is malformed: could not convert string to float"),
    (lambda a, m: m.update(input_shape=[1, 16]), "is malformed: input_shape must be"),
    (lambda a, m: m.update(pix_grid=[4, 4]), r"is malformed: pix_grid \[4, 4\] does not match"),
    (lambda a, m: m.update(components=["features", "colour"]), "is malformed: components must be"),
    (lambda a, m: m.update(format="medsight-ood/1"), "is a single-score detector .*retrain the bundle"),
    (lambda a, m: m.update(format="other/9"), "not an OOD detector"),
    (lambda a, m: a.update(means=np.array([{"code": 1}], dtype=object)), "cannot read OOD detector .*Object arrays"),
    (lambda a, m: a.update(meta_is="[1, 2]"), "cannot read OOD detector .*not a JSON object"),
    (lambda a, m: a.update(meta_is="{broken"), "cannot read OOD detector .*JSONDecodeError"),
    (lambda a, m: a.update(meta_is=None), "cannot read OOD detector .*KeyError"),
])
def test_malformed_ood_npz_is_refused_with_one_line(tmp_path, change, message):
    det, _, _ = _toy_detector()
    good = ood.save_ood(tmp_path / "good.npz", det)
    with np.load(good, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "meta"}
        meta = json.loads(str(z["meta"]))
    change(arrays, meta)
    meta = arrays.pop("meta_is", meta)
    bad = tmp_path / "ood.npz"
    _rewrite(bad, arrays, meta) if meta is not None else np.savez(bad, **arrays)
    with pytest.raises(MedsightError, match=message) as e:
        ood.load_ood(bad)
    assert isinstance(e.value, DataError) and "\n" not in str(e.value)
    if "not an OOD detector" not in message:
        assert str(bad) in str(e.value)


def test_detect_and_score_from_outputs_agree_with_a_model():
    """The torch path (detect) and the ONNX path (score_from_outputs on logits + features + x) give one score."""
    m = _tiny().eval()
    xtr, xva = torch.from_numpy(_smooth_images(60, 1, 4)), torch.from_numpy(_smooth_images(30, 2, 4))
    det = ood.fit_ood_detector(m, xtr, np.arange(60) % 2, xva)
    assert det["score"] == "combined" and det["layer"] == "3"
    x = torch.cat([xva[:4], torch.rand(3, 1, 4, 4)])
    r = ood.detect(m, x, det)
    logits, feats = ood.WithFeatures(m)(x)
    onnx_like = ood.score_from_outputs(logits.detach().numpy(), feats.detach().numpy(), det, x=x.numpy())
    np.testing.assert_allclose(r["ood_score"], onnx_like, rtol=1e-6)
    assert set(r["components"]) == set(ood.COMPONENTS) and r["ood_flag"].tolist() == (onnx_like > 1).tolist()


# --------------------------------------------------------------------------------------------- real data
@functools.cache
def _breast_model(root: str):
    """The packaged breastmnist recipe's model (cnn6, augmentation; one member, not its ensemble) for 10 epochs."""
    from medsight.config import load_config
    from medsight.data.sources import load_medmnist
    from medsight.train import fit

    data = load_medmnist("breastmnist", 28, root=root, download_missing=False)
    cfg = load_config(None, {"train.epochs": 10, "train.seed": 0, "train.device": "cpu", "train.threads": 1},
                      recipe="breastmnist")
    threads = torch.get_num_threads()
    try:
        return fit(cfg, data).model.eval(), data
    finally:
        torch.set_num_threads(threads)


def test_breast_detector_flags_chest_xrays_noise_and_blanks(medmnist_dir):
    """The finding of issue 14: features-only Mahalanobis let most chest X-rays and noise through a BreastMNIST
    model; the combined detector flags them at <= 5 % false alarms on the breast test split."""
    from medsight.data.sources import load_medmnist

    root = root_of(medmnist_dir)
    model, data = _breast_model(root)
    tr, va, te = (data.splits[s] for s in ("train", "val", "test"))
    det = ood.fit_ood_detector(model, tr.images, tr.labels, va.images)  # TRAIN fit, VAL thresholds
    old = base.mahalanobis_detector(model, tr.images, tr.labels, va.images)  # features alone, val 95th percentile
    pneu = load_medmnist("pneumoniamnist", 28, root=root, download_missing=False).splits["test"].images
    own = ood.detect(model, te.images, det)["ood_flag"].mean()
    assert own <= 0.05, own
    flagged = ood.detect(model, pneu, det)["ood_flag"].mean()
    assert flagged >= 0.95, flagged
    assert base.mahalanobis_flags(model, pneu, old).mean() < flagged  # features alone: 8-51 % in our runs
    rng = np.random.default_rng(0)
    probes = {"constant 0": np.zeros((20, 1, 28, 28), np.float32), "constant 1": np.ones((20, 1, 28, 28), np.float32),
              "uniform noise": rng.random((20, 1, 28, 28), dtype=np.float32),
              "gaussian noise": np.clip(0.5 + 0.2 * rng.standard_normal((20, 1, 28, 28)), 0, 1).astype(np.float32)}
    for name, x in probes.items():
        assert ood.detect(model, x, det)["ood_flag"].all(), name
