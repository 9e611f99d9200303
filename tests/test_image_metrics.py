"""Digits metrics: FID/KID against independent references, the classifier judge, and its cache."""

import json
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from ditx.modalities.image import digits_classifier as DC
from ditx.modalities.image import metrics as M
from ditx.modalities.image.data import DigitsDataset

from ditx import metrics as core
from ditx.files import ditx_cache_dir

pytest.importorskip("torchmetrics")


# ---------------------------------------------------------------------------------------
# fixtures: the classifier trains once per session, in a temporary cache
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ditx-cache")


@pytest.fixture(scope="session")
def classifier(cache_dir):
    return DC.load_or_train_digits_classifier(16, 1, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def test_split():
    return DigitsDataset(size=16, channels=1, split="test")


@pytest.fixture(scope="session")
def metric(cache_dir, classifier, test_split):
    m = M.DigitsMetric(cache_dir=str(cache_dir))
    m.prepare(test_split, "cpu")
    return m


def gaussian_samples(n, mean, cov, seed):
    """n samples whose sample mean and (unbiased) sample covariance are exactly ``mean`` and ``cov``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(mean), generator=g, dtype=torch.float64)
    x = x - x.mean(0)
    x = x @ torch.linalg.inv(torch.linalg.cholesky(x.T @ x / (n - 1))).T  # sample covariance = I
    return x @ torch.linalg.cholesky(cov).T + mean


# ---------------------------------------------------------------------------------------
# distances vs closed forms / definitions
# ---------------------------------------------------------------------------------------


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    d = 6
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    var1 = torch.rand(d, generator=g, dtype=torch.float64) * 2 + 0.1
    var2 = torch.rand(d, generator=g, dtype=torch.float64) * 2 + 0.1
    a = gaussian_samples(200, mu1, torch.diag(var1), seed=1)
    b = gaussian_samples(300, mu2, torch.diag(var2), seed=2)

    expected = float(((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * (var1 * var2).sqrt()).sum())
    assert core.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert core.frechet_distance(b, a) == pytest.approx(expected, rel=1e-6)
    assert abs(core.frechet_distance(a, a)) < 1e-8


def test_distances_refuse_non_finite_features_with_a_clear_error():
    """NaN features (samples of a diverged model) get a ValueError naming them, not an abort in MKL's eigvals."""
    a, b = torch.randn(40, 8, dtype=torch.float64), torch.randn(30, 8, dtype=torch.float64)
    b[3, 2] = float("nan")
    b[7, 0] = float("inf")
    with pytest.raises(ValueError, match=r"features_b: 2 of 30 rows are not finite"):
        core.frechet_distance(a, b)
    with pytest.raises(ValueError, match=r"features_b: 2 of 30 rows are not finite"):
        core.kernel_distance(a, b, subsets=2, subset_size=10)


def test_frechet_distance_matches_scipy_sqrtm_for_general_covariances():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(150, 5)) @ rng.normal(size=(5, 5)) + 1.0
    b = rng.normal(size=(120, 5)) @ rng.normal(size=(5, 5))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert core.frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-6)


def test_kernel_distance_is_the_unbiased_polynomial_mmd():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 8, generator=g, dtype=torch.float64)
    b = torch.randn(40, 8, generator=g, dtype=torch.float64) * 1.5 + 0.3

    def k(x, y):
        return (x @ y.T / x.shape[1] + 1) ** 3

    m = len(a)
    off = 1 - torch.eye(m, dtype=torch.float64)
    expected = (k(a, a) * off).sum() / (m * (m - 1)) + (k(b, b) * off).sum() / (m * (m - 1)) - 2 * k(a, b).mean()
    # one subset of the whole set: the estimate is the MMD² of the full sets
    mean, std = core.kernel_distance(a, b, subsets=1, subset_size=m)
    assert mean == pytest.approx(float(expected), rel=1e-6)
    assert std == 0.0
    # subset_size larger than the sets is capped, not an error
    assert core.kernel_distance(a, b, subsets=1, subset_size=10_000)[0] == pytest.approx(float(expected), rel=1e-6)


def test_kernel_distance_is_reproducible_and_leaves_the_global_rng_alone():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 4, generator=g), torch.randn(60, 4, generator=g) + 0.5
    state = torch.get_rng_state()
    first = core.kernel_distance(a, b, subsets=20, subset_size=30, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert core.kernel_distance(a, b, subsets=20, subset_size=30, seed=3) == first
    assert core.kernel_distance(a, b, subsets=20, subset_size=30, seed=4) != first
    assert first[1] > 0  # different subsets give different estimates


def test_distances_reject_bad_feature_shapes():
    with pytest.raises(ValueError, match="feature sizes differ"):
        core.frechet_distance(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="N >= 2"):
        core.kernel_distance(torch.randn(1, 3), torch.randn(10, 3))


# ---------------------------------------------------------------------------------------
# the classifier and the digits metric
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels,size", [(1, 8), (1, 16), (3, 32), (1, 64)])
def test_classifier_takes_any_size_and_1_or_3_channels(channels, size):
    model = DC.DigitsClassifier(channels)
    x = torch.rand(5, channels, size, size) * 2 - 1
    assert model(x).shape == (5, 10)
    assert model.features(x).shape == (5, DC.FEATURE_DIM)
    with pytest.raises(ValueError, match="expects"):
        model(torch.rand(5, 3 if channels == 1 else 1, size, size))


def test_classifier_is_accurate_on_the_test_split(classifier, test_split):
    with torch.no_grad():
        predictions = classifier(test_split.images).argmax(1)
    accuracy = (predictions == test_split.labels).double().mean().item()
    assert accuracy >= 0.97
    assert classifier.test_accuracy == pytest.approx(accuracy)


def test_class_accuracy_with_true_and_shuffled_labels(metric, test_split):
    result = metric.compute(test_split.images, test_split.labels)
    assert result["class_accuracy"] >= 0.97
    assert result["classifier_test_accuracy"] >= 0.97
    shuffled = test_split.labels[torch.randperm(len(test_split), generator=torch.Generator().manual_seed(0))]
    assert metric.compute(test_split.images, shuffled)["class_accuracy"] == pytest.approx(0.1, abs=0.05)
    assert "class_accuracy" not in metric.compute(test_split.images)  # unconditional samples


def test_fid_and_kid_separate_real_digits_from_noise(metric, test_split):
    same = metric.compute(test_split.images, test_split.labels)
    train = DigitsDataset(size=16, channels=1, split="train")
    other_split = metric.compute(train.images, train.labels)
    noise = torch.rand(len(test_split), 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noisy = metric.compute(noise)

    assert abs(same["fid"]) < 1e-6
    assert noisy["fid"] > 10.0
    assert 0 <= other_split["fid"] < 0.05 * noisy["fid"]
    # KID of a set against itself: 0 up to subset noise, tiny next to noise images
    assert abs(same["kid"]) < 0.05 * noisy["kid"]
    assert abs(other_split["kid"]) < 0.05 * noisy["kid"]
    assert noisy["kid"] > 3 * noisy["kid_std"] > 0


def test_samples_at_another_resolution_are_judged_the_same_way(metric, test_split):
    upsampled = torch.nn.functional.interpolate(test_split.images, size=32, mode="bilinear", align_corners=False)
    result = metric.compute(upsampled, test_split.labels)
    assert result["class_accuracy"] >= 0.95


def test_metric_rejects_bad_input(metric, cache_dir):
    with pytest.raises(RuntimeError, match="before prepare"):
        M.DigitsMetric(cache_dir=str(cache_dir)).compute(torch.zeros(4, 1, 16, 16))
    with pytest.raises(ValueError, match="like the reference"):
        metric.compute(torch.zeros(4, 3, 16, 16))
    with pytest.raises(ValueError, match="labels must be"):
        metric.compute(torch.zeros(4, 1, 16, 16), torch.zeros(3, dtype=torch.long))


def test_protocol_describes_the_judge_and_reference(metric, classifier, test_split):
    protocol = json.loads(json.dumps(metric.protocol()))
    assert protocol["reference_size"] == len(test_split)
    assert protocol["feature_extractor"]["settings_hash"] == classifier.settings_hash
    assert protocol["feature_extractor"]["weights_sha256"] == classifier.weights_sha256
    assert protocol["kid"]["degree"] == 3


# ---------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------


def test_second_call_loads_from_the_cache(cache_dir, classifier, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("load_or_train_digits_classifier retrained although the cache holds the model")

    monkeypatch.setattr(DC, "train_digits_classifier", no_training)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = DC.load_or_train_digits_classifier(16, 1, cache_dir=cache_dir)
    for (name, a), (_, b) in zip(classifier.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.weights_sha256 == classifier.weights_sha256
    # only the finished file is there: no temporaries left by the atomic write
    assert [p.name for p in cache_dir.iterdir()] == [DC.classifier_cache_path(classifier.settings, cache_dir).name]


def test_corrupted_cache_file_is_retrained_with_a_warning(cache_dir, classifier, tmp_path, monkeypatch):
    path = DC.classifier_cache_path(classifier.settings, tmp_path)
    data = bytearray(DC.classifier_cache_path(classifier.settings, cache_dir).read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))  # a truncated file, as after a crash without atomic writes

    calls = []

    def cheap_training(settings, device="cpu"):  # stands in for the real (tested above) training
        calls.append(settings)
        torch.manual_seed(0)
        return DC.DigitsClassifier(settings["channels"]).eval()

    monkeypatch.setattr(DC, "train_digits_classifier", cheap_training)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        retrained = DC.load_or_train_digits_classifier(16, 1, cache_dir=tmp_path)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("could not be loaded" in m for m in messages), messages
    assert any("test accuracy" in m for m in messages), messages  # the untrained stand-in is flagged too
    assert len(calls) == 1
    # the cache now holds the retrained model, and loads without training
    monkeypatch.setattr(DC, "train_digits_classifier", lambda *a, **k: pytest.fail("trained twice"))
    again = DC.load_or_train_digits_classifier(16, 1, cache_dir=tmp_path)
    assert torch.equal(again.head.weight, retrained.head.weight)


def test_cache_location_and_key(monkeypatch, tmp_path):
    monkeypatch.setenv("DITX_CACHE", str(tmp_path))
    assert ditx_cache_dir() == tmp_path
    s16, s32 = DC.classifier_settings(16, 1), DC.classifier_settings(32, 1)
    assert DC.classifier_cache_path(s16).parent == tmp_path
    assert DC.classifier_cache_path(s16) != DC.classifier_cache_path(s32)
    assert DC.classifier_cache_path(s16) == DC.classifier_cache_path(DC.classifier_settings(16, 1))
