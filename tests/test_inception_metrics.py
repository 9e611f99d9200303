"""Inception metrics (FID, IS, KID with torch-fidelity's Inception-v3) and the ADM ``.npz`` writer.

The real Inception weights cannot be downloaded here, so the end-to-end tests use a randomly
initialised ``FeatureExtractorInceptionV3`` saved to a temporary file: that proves the loading
and the pipeline, not the published numbers.
"""

import hashlib
import math
import sys

import numpy as np
import pytest
import torch
from ditx.modalities.image import inception as INC
from ditx.modalities.image import metrics as M
from ditx.modalities.image.io import write_adm_npz

from ditx import metrics as core
from ditx.data import Dataset

pytest.importorskip("torchmetrics")


# ---------------------------------------------------------------------------------------
# Inception Score against closed forms
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("splits", [1, 4])
def test_inception_score_of_uniform_predictions_is_one(splits):
    score, std = INC.inception_score(torch.zeros(40, 1008), splits=splits)
    assert score == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("classes", [1, 2, 7, 10])
def test_inception_score_of_confident_predictions_spread_evenly_is_the_class_count(classes):
    probs = torch.eye(classes, dtype=torch.float64).repeat(5, 1)  # one-hot, 5 images per class
    score, _ = INC.inception_score(probs.log(), splits=1)  # probabilities go in as log-probabilities
    assert score == pytest.approx(classes, rel=1e-12)


def test_inception_score_matches_its_definition_on_random_predictions():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(50, 12, generator=g, dtype=torch.float64), dim=1).numpy()
    marginal = probs.mean(0)
    expected = math.exp(np.mean(np.sum(probs * (np.log(probs) - np.log(marginal)), axis=1)))
    score, _ = INC.inception_score(torch.from_numpy(probs).log(), splits=1)
    assert score == pytest.approx(expected, rel=1e-10)


def test_inception_score_splits_are_seeded_and_leave_the_global_rng_alone():
    logits = torch.randn(60, 20, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = INC.inception_score(logits, splits=10, seed=5)
    assert torch.equal(torch.rand(3), expected_next)
    assert INC.inception_score(logits, splits=10, seed=5) == first
    assert 1.0 <= first[0] <= 20.0 and first[1] > 0


def test_inception_score_rejects_more_splits_than_predictions():
    with pytest.raises(ValueError, match="splits"):
        INC.inception_score(torch.zeros(3, 10), splits=4)


# ---------------------------------------------------------------------------------------
# FID against precomputed reference statistics
# ---------------------------------------------------------------------------------------


def test_frechet_distance_to_stats_equals_the_distance_to_the_features_they_summarise():
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(40, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g).double() + 3
    samples = torch.randn(30, 6, generator=g, dtype=torch.float64)
    mu, sigma = reference.mean(0), torch.cov(reference.T)
    expected = core.frechet_distance(reference, samples)
    assert core.frechet_distance_to_stats(mu, sigma, samples) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="sigma"):
        core.frechet_distance_to_stats(mu, sigma[:5, :5], samples)


def test_reference_stats_file_without_mu_and_sigma_is_refused(tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="mu.*sigma"):
        INC.load_reference_stats(path)


# ---------------------------------------------------------------------------------------
# finding the weights: never a download unless asked, and a usable error
# ---------------------------------------------------------------------------------------


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    monkeypatch.delenv(INC.INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty torch.hub directory
    return tmp_path


def test_missing_weights_error_names_the_file_where_to_get_it_and_how_to_pass_it(no_weights_anywhere):
    metric = M.InceptionMetric(reference_stats=no_weights_anywhere / "unused.npz")
    with pytest.raises(FileNotFoundError) as info:
        metric.prepare(None, "cpu")
    message = str(info.value)
    for needed in (INC.INCEPTION_WEIGHTS_FILE, "weights_path", INC.INCEPTION_WEIGHTS_ENV, "https://", "download=True"):
        assert needed in message


def test_a_given_but_missing_weights_file_is_an_error_not_a_fallback(no_weights_anywhere, monkeypatch):
    hub = no_weights_anywhere / "torch-home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / INC.INCEPTION_WEIGHTS_FILE).write_bytes(b"present")
    missing = no_weights_anywhere / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth.*" + INC.INCEPTION_WEIGHTS_FILE):
        INC.find_inception_weights(missing)
    monkeypatch.setenv(INC.INCEPTION_WEIGHTS_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=INC.INCEPTION_WEIGHTS_ENV):
        INC.find_inception_weights()


def test_weights_are_found_from_the_argument_the_environment_and_the_torch_hub_directory(
    no_weights_anywhere, monkeypatch
):
    given = no_weights_anywhere / "given.pth"
    from_env = no_weights_anywhere / "env.pth"
    given.write_bytes(b"x")
    from_env.write_bytes(b"x")
    hub = no_weights_anywhere / "torch-home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / INC.INCEPTION_WEIGHTS_FILE_TORCH_FIDELITY).write_bytes(b"x")
    assert INC.find_inception_weights() == hub / INC.INCEPTION_WEIGHTS_FILE_TORCH_FIDELITY
    monkeypatch.setenv(INC.INCEPTION_WEIGHTS_ENV, str(from_env))
    assert INC.find_inception_weights() == from_env
    assert INC.find_inception_weights(given) == given


def test_a_file_that_is_not_a_state_dict_is_refused_with_the_how_to(tmp_path):
    bad = tmp_path / "not-weights.pth"
    bad.write_bytes(b"this is not a torch file")
    try:
        INC.inception_extractor_class()
    except ImportError as e:
        pytest.skip(f"torch-fidelity is not importable: {e}")
    with pytest.raises(ValueError, match=INC.INCEPTION_WEIGHTS_FILE):
        INC.load_inception_extractor(bad)


def test_missing_torch_fidelity_is_an_import_error_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # None in sys.modules: "not installed"
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(ImportError, match="pip install --no-deps"):
        INC.inception_extractor_class()


# ---------------------------------------------------------------------------------------
# end to end with a randomly initialised network (the loading code, not the published numbers)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A state dict of a randomly initialised FeatureExtractorInceptionV3, saved like the real weights file."""
    try:
        extractor = INC.inception_extractor_class()
    except ImportError as e:
        pytest.skip(f"torch-fidelity is not importable: {e}")
    module = sys.modules[extractor.__module__]
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng(devices=[]):
        # keep the random initialisation: nothing is read, and nothing can be downloaded
        mp.setattr(module, "load_state_dict_from_url", lambda *args, **kwargs: {})
        mp.setattr(extractor, "load_state_dict", lambda self, state_dict, strict=True: None)
        torch.manual_seed(0)
        network = extractor("inception-v3-compat", ["2048"])
    for m in network.modules():
        if isinstance(m, torch.nn.Conv2d):  # He init keeps activations O(1) through the ~90 layers
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(network.state_dict(), path)
    return path


class ImageList(Dataset):
    """A dataset of {"x": image} items and no ``images`` attribute: the metric must stream it."""

    def __init__(self, images):
        self._images = images

    def __len__(self):
        return len(self._images)

    def __getitem__(self, i):
        return {"x": self._images[i]}


@pytest.fixture(scope="module")
def image_sets():
    g = torch.Generator().manual_seed(0)
    reference = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1  # noise over the full range
    other = torch.rand(4, 3, 32, 32, generator=g) * 0.3 - 0.9  # dark, low contrast
    return reference, other


@pytest.fixture(scope="module")
def prepared(random_weights, image_sets):
    # feature=64 keeps FID's matrix square root small; the 2048-d layer takes the same path through the network
    metric = M.InceptionMetric(weights_path=str(random_weights), feature=64, is_splits=2, kid_subsets=5)
    with pytest.warns(RuntimeWarning, match="not the official"):
        metric.prepare(ImageList(image_sets[0]), "cpu")
    return metric


@pytest.fixture(scope="module")
def results(prepared, image_sets):
    reference, other = image_sets
    return {"same": prepared.compute(reference), "different": prepared.compute(other, labels=torch.arange(4))}


def test_fid_of_a_set_to_itself_is_zero_and_to_another_set_positive(results):
    same, different = results["same"], results["different"]
    assert set(same) == {"fid", "inception_score", "inception_score_std", "kid", "kid_std"}
    assert different["fid"] > 1e-3
    assert abs(same["fid"]) < 1e-6 * different["fid"]
    assert different["kid"] > same["kid"]
    for result in (same, different):
        assert result["inception_score"] >= 1.0 - 1e-9
        assert all(math.isfinite(v) for v in result.values())


def test_protocol_records_samples_reference_weights_and_versions(prepared, results, random_weights):
    protocol = prepared.protocol()
    assert protocol["num_samples"] == 4
    assert protocol["reference_size"] == 4 and protocol["reference"]["dataset"] == "ImageList"
    extractor = protocol["feature_extractor"]
    assert extractor["weights_file"] == "random-inception.pth"
    assert extractor["weights_sha256"] == hashlib.sha256(random_weights.read_bytes()).hexdigest()
    assert extractor["weights_official"] is False
    assert "299" in protocol["preprocessing"]["resize"] and "bilinear" in protocol["preprocessing"]["resize"]
    assert protocol["torchmetrics_version"]
    assert protocol["inception_score"]["splits_used"] == 2


def test_reference_stats_file_gives_the_same_fid_as_the_reference_set(
    prepared, results, image_sets, random_weights, tmp_path
):
    stats = prepared.write_reference_stats(tmp_path / "reference.npz")
    with np.load(stats) as data:
        assert data["mu"].shape == (64,) and data["sigma"].shape == (64, 64)
    from_stats = M.InceptionMetric(weights_path=str(random_weights), reference_stats=str(stats), feature=64)
    with pytest.warns(RuntimeWarning, match="not the official"):
        from_stats.prepare(None, "cpu")
    result = from_stats.compute(image_sets[1])
    assert set(result) == {"fid", "inception_score", "inception_score_std"}  # KID needs reference features
    assert result["fid"] == pytest.approx(results["different"]["fid"], rel=1e-6)
    assert from_stats.protocol()["reference"]["stats_file"] == str(stats)


# ---------------------------------------------------------------------------------------
# the ADM evaluation-suite .npz
# ---------------------------------------------------------------------------------------


def test_adm_npz_holds_uint8_nhwc_images_and_int64_labels(tmp_path):
    g = torch.Generator().manual_seed(0)
    samples = torch.rand(8, 3, 32, 32, generator=g) * 2.4 - 1.2  # a little outside [-1, 1]: clamped
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    path = write_adm_npz(samples, tmp_path / "samples.npz", labels)
    with np.load(path) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        images, saved_labels = data["arr_0"], data["arr_1"]
    expected = np.round((np.clip(samples.numpy(), -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    assert images.dtype == np.uint8 and images.shape == (8, 32, 32, 3)
    np.testing.assert_array_equal(images, expected)
    assert saved_labels.dtype == np.int64
    np.testing.assert_array_equal(saved_labels, labels.numpy())
    assert [p.name for p in tmp_path.iterdir()] == ["samples.npz"]  # no temporary left behind


def test_adm_npz_repeats_grey_to_rgb_and_omits_labels_when_none(tmp_path):
    samples = torch.linspace(-1, 1, 2 * 16).reshape(2, 1, 4, 4)
    with np.load(write_adm_npz(samples, tmp_path / "grey.npz")) as data:
        assert data.files == ["arr_0"]
        images = data["arr_0"]
    assert images.shape == (2, 4, 4, 3)
    assert (images == images[..., :1]).all()
    assert images.min() == 0 and images.max() == 255


def test_adm_npz_bad_labels_leave_an_existing_file_untouched(tmp_path):
    path = write_adm_npz(torch.zeros(2, 3, 4, 4), tmp_path / "s.npz")
    before = path.read_bytes()
    with pytest.raises(ValueError, match="labels"):
        write_adm_npz(torch.zeros(2, 3, 4, 4), path, labels=torch.zeros(3, dtype=torch.long))
    assert path.read_bytes() == before
