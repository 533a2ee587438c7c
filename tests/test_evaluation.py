"""Evaluation on real MNIST: the classifier extractor, sanity of FID/KID/precision-recall, the reference
cache, the Inception path (offline, with a local weights file of the right shapes), evaluate() and the CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF

from diffusion_core import load_model
from diffusion_core.cli import main
from diffusion_core.config import MIN_SCORED_IMAGES, ConfigError, DataConfig
from diffusion_core.data import prepare_dataset
from diffusion_core.evaluation import compute_metrics, evaluate, resolve_extractor, train_classifier
from diffusion_core.evaluation.classifier import accuracy, load_classifier
from diffusion_core.evaluation.classifier_store import cache_path, ensure_classifier, file_sha256, shipped_path

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


@pytest.fixture(scope="session")
def prepared(mnist_raw_source, data_dir):
    return prepare_dataset("mnist", str(mnist_raw_source), data_dir)


@pytest.fixture(scope="session")
def lenet(prepared, data_dir):
    return resolve_extractor("lenet", prepared, data_dir, progress=False)


@pytest.fixture(scope="session")
def real(prepared):
    """(300 random train images, 600 random test images), uint8. Random, because the MNIST test split is
    ordered by writer population (its first half is cleaner than its second)."""
    generator = torch.Generator().manual_seed(0)
    train, _ = prepared.load("train")
    test, _ = prepared.load("test")
    return (train[torch.randperm(len(train), generator=generator)[:300]],
            test[torch.randperm(len(test), generator=generator)[:600]])


@pytest.fixture()
def offline(monkeypatch):
    """No network: every socket connection attempt fails as it does on a machine without internet."""
    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(socket, "create_connection", refuse)


def metrics(images, reference, extractor):
    return compute_metrics(images, reference, extractor, progress=False)


# --- the lenet extractor ------------------------------------------------------------------------------------------

def test_shipped_classifier_is_verified_and_accurate(prepared, lenet):
    assert lenet.weights_path == shipped_path("mnist"), "the shipped weights should match the canonical MNIST"
    meta = json.loads(lenet.weights_path.with_suffix(".json").read_text())
    sha = file_sha256(lenet.weights_path)
    assert sha == meta["weights_sha256"] and meta["dataset_sha256"] == prepared.sha256
    assert lenet.extractor_id == f"lenet-mnist-{sha[:12]}"
    assert lenet.weights_path.stat().st_size < 1_000_000
    assert accuracy(load_classifier(lenet.weights_path), *prepared.load("test")) >= 0.99


def test_classifier_training_is_seeded_and_learns(prepared):
    images, labels = prepared.load("train")
    test_images, test_labels = prepared.load("test")
    first, second = (train_classifier(images[:500], labels[:500], epochs=1, seed=3, progress=False) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    net = train_classifier(images[:4000], labels[:4000], epochs=1, batch_size=32, seed=0, progress=False)
    assert accuracy(net, test_images[:2000], test_labels[:2000]) > 0.9


def test_cached_classifier_is_preferred_and_a_changed_file_refused(prepared, lenet, tmp_path):
    cached = cache_path(prepared, tmp_path)
    cached.parent.mkdir(parents=True)
    shutil.copy(lenet.weights_path, cached)
    shutil.copy(lenet.weights_path.with_suffix(".json"), cached.with_suffix(".json"))
    assert ensure_classifier(prepared, tmp_path, progress=False).weights_path == cached
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0xFF
    cached.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="sha256"):
        ensure_classifier(prepared, tmp_path, progress=False)
    assert cached.read_bytes() == bytes(data)  # not silently retrained


# --- metric sanity ------------------------------------------------------------------------------------------------

def test_fid_of_a_set_against_itself_is_zero(lenet, real):
    _, test = real
    m = metrics(test, test, lenet)
    assert abs(m["fid"]) < 1e-3
    assert m["precision"] == 1.0 and m["recall"] == 1.0


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # dead ReLU units: zero-variance features
def test_fid_is_the_frechet_distance_of_the_classifiers_fc1_features(lenet, real):
    """FID against an independent computation: the classifier's own `fc1` activations (the layer the lenet
    extractor names), Gaussians fitted in float64, and scipy's matrix square root in
    |μ1 − μ2|² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) (Heusel et al. 2017). Fails for another layer or another distance."""
    import numpy as np
    from scipy import linalg

    train, test = real
    net = load_classifier(lenet.weights_path)
    with torch.no_grad():
        a, b = (net.features(images)["fc1"].double().numpy() for images in (train, test))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (((a.mean(0) - b.mean(0)) ** 2).sum()
                + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real))
    assert metrics(train, test, lenet)["fid"] == pytest.approx(expected, rel=1e-3)


def test_resampled_frechet_distances_match_scipy_for_every_resample():
    """The fast path behind fid_std (one symmetric eigendecomposition per resample) against scipy's matrix
    square root on each resample's own statistics, for features with strongly unequal variances."""
    import numpy as np
    from scipy import linalg

    from diffusion_core.evaluation.metrics import frechet_distances

    rng = np.random.default_rng(0)
    dims = 12
    mix = rng.normal(size=(dims, dims)) * np.logspace(-2, 1, dims)
    generated, real = rng.normal(size=(300, dims)) @ mix + 0.5, rng.normal(size=(2000, dims)) @ mix.T
    real_mu, real_sigma = real.mean(0), np.cov(real, rowvar=False)
    index_sets = rng.integers(0, len(generated), size=(4, len(generated)))
    for index, fid in zip(index_sets, frechet_distances(generated, real_mu, real_sigma, index_sets)):
        x = generated[index]
        sigma = np.cov(x, rowvar=False)
        expected = (((x.mean(0) - real_mu) ** 2).sum()
                    + np.trace(sigma + real_sigma - 2 * linalg.sqrtm(sigma @ real_sigma).real))
        assert fid == pytest.approx(expected, rel=1e-9)


def test_fid_std_matches_the_spread_of_independent_generated_sets():
    """fid_std is read as the standard error of one evaluation. Oracle: Gaussian features with a known
    law; the FIDs of 300 independent generated sets of n = 500 spread by s. The bootstrap estimate from
    single sets must average within [0.8, 1.3]·s (it reads ~1.1·s): resampling without replacement gives
    0, resampling n/2 gives ~1.5·s, resampling the reference instead gives its far smaller spread."""
    import numpy as np

    from diffusion_core.evaluation.metrics import fid_bootstrap_std, frechet_distances

    rng = np.random.default_rng(1)
    dims, n = 16, 500
    mix = rng.normal(size=(dims, dims)) / np.sqrt(dims)
    real = torch.from_numpy(rng.normal(size=(20000, dims)) @ (np.eye(dims) + mix))

    def generated_set() -> np.ndarray:
        return rng.normal(size=(n, dims)) @ mix.T * 1.3 + 0.3

    real_np = real.numpy()
    whole = np.arange(n)[None]
    fids = [frechet_distances(generated_set(), real_np.mean(0), np.cov(real_np, rowvar=False), whole)[0]
            for _ in range(300)]
    spread = np.std(fids, ddof=1)
    estimates = [fid_bootstrap_std(torch.from_numpy(generated_set()), real, 200, seed=k) for k in range(8)]
    assert 0.8 * spread <= np.mean(estimates) <= 1.3 * spread, (np.mean(estimates), spread)


def test_paired_gap_std_matches_the_spread_of_the_gap_over_independent_paired_draws():
    """σ_gap is read as the standard error of FID(b) − FID(a) when image i of both sets starts from the
    same noise. Oracle: Gaussian features, b_i correlated with a_i (ρ = 0.9) through shared normal
    draws; the gaps of 300 independent paired draws spread by s. The paired bootstrap from single draws
    must average within [0.8, 1.3]·s, and s must sit far below the unpaired √(σ_a² + σ_b²) the gate used
    before (resampling a and b with different indices reads that, and fails the first check)."""
    import numpy as np

    from diffusion_core.evaluation.metrics import fid_bootstrap_std, fid_gap_bootstrap_std, frechet_distances

    rng = np.random.default_rng(2)
    dims, n, rho = 16, 500, 0.9
    mix = rng.normal(size=(dims, dims)) / np.sqrt(dims)
    real = torch.from_numpy(rng.normal(size=(20000, dims)) @ (np.eye(dims) + mix))
    real_np = real.numpy()
    real_mu, real_sigma = real_np.mean(0), np.cov(real_np, rowvar=False)

    def paired_draw() -> tuple[np.ndarray, np.ndarray]:
        z, w = rng.normal(size=(n, dims)), rng.normal(size=(n, dims))
        a = z @ mix.T * 1.3 + 0.3
        b = (rho * z + np.sqrt(1 - rho**2) * w) @ mix.T * 1.2 + 0.25
        return a, b

    whole = np.arange(n)[None]
    gaps = []
    for _ in range(300):
        a, b = paired_draw()
        gaps.append(frechet_distances(b, real_mu, real_sigma, whole)[0] - frechet_distances(a, real_mu, real_sigma, whole)[0])
    spread = np.std(gaps, ddof=1)
    draws = [tuple(torch.from_numpy(x) for x in paired_draw()) for _ in range(8)]
    estimates = [fid_gap_bootstrap_std(a, b, real, 200, seed=k) for k, (a, b) in enumerate(draws)]
    assert 0.8 * spread <= np.mean(estimates) <= 1.3 * spread, (np.mean(estimates), spread)
    unpaired = np.mean([np.hypot(fid_bootstrap_std(a, real, 200, seed=k), fid_bootstrap_std(b, real, 200, seed=k + 100))
                        for k, (a, b) in enumerate(draws)])
    assert unpaired > 2 * spread, (unpaired, spread)


def test_paired_gap_std_of_a_shifted_copy_is_the_closed_form():
    """b = a + c (every feature shifted by one vector): per resample, FID(b) − FID(a) = 2·c·(μ*_a − μ_r) + |c|²
    exactly (the covariances are equal), so σ_gap = 2·√(Var(c·a) / n), Var the population variance (the
    bootstrap mean's spread). A copy of a gives exactly 0. Resampling a and b with different indices
    adds both covariances' noise and fails this."""
    import numpy as np

    from diffusion_core.evaluation.metrics import fid_gap_bootstrap_std

    rng = np.random.default_rng(3)
    dims, n = 8, 400
    a = rng.normal(size=(n, dims)) @ rng.normal(size=(dims, dims)) / 3
    c = rng.normal(size=dims) * 0.5
    real = torch.from_numpy(rng.normal(size=(5000, dims)))
    expected = 2 * np.sqrt((a @ c).var() / n)
    got = fid_gap_bootstrap_std(torch.from_numpy(a), torch.from_numpy(a + c), real, 4000, seed=0)
    assert got == pytest.approx(expected, rel=0.04)
    assert fid_gap_bootstrap_std(torch.from_numpy(a), torch.from_numpy(a.copy()), real, 50) == 0.0
    with pytest.raises(ValueError, match="one shape"):
        fid_gap_bootstrap_std(torch.from_numpy(a), torch.from_numpy(a[:-1]), real, 50)


def test_real_images_score_far_better_than_noise(lenet, real):
    train, test = real
    noise = torch.randint(0, 256, train.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    good, bad = metrics(train, test, lenet), metrics(noise, test, lenet)
    assert good["fid"] * 20 < bad["fid"]
    assert good["kid"] * 20 < bad["kid"]
    # noise collapses to one point in feature space: no real image lies in its k-NN balls (its precision
    # can still be high, a known weakness of k-NN precision when one set is degenerate)
    assert good["recall"] > 0.5 > bad["recall"]


def _gaussian_noise(images: torch.Tensor, sigma: float) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1)) * sigma
    return (images.float() + noise).clamp(0, 255).round().to(torch.uint8)


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    return TF.gaussian_blur(images.float(), kernel_size=9, sigma=sigma).round().to(torch.uint8)


@pytest.fixture(scope="session")
def clean_fid(lenet, real):
    return metrics(*real, lenet)["fid"]


@pytest.mark.parametrize("degrade, levels", [(_gaussian_noise, (16.0, 48.0, 96.0)), (_blur, (0.7, 1.2, 2.0))],
                         ids=["noise", "blur"])
def test_fid_grows_monotonically_with_degradation(lenet, real, clean_fid, degrade, levels):
    train, test = real
    fids = [clean_fid] + [metrics(degrade(train, s), test, lenet)["fid"] for s in levels]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_kid_with_fewer_images_than_its_default_subset_size(lenet, real):
    train, test = real
    m = metrics(train[:50], test[:300], lenet)
    assert math.isfinite(m["kid"]) and math.isfinite(m["kid_std"]) and m["kid_std"] > 0


def test_the_fewest_scored_images_is_the_least_precision_recall_can_use(lenet, real):
    """Precision/recall need each image's 3 nearest neighbours among the others of its set: 4 images."""
    train, test = real
    m = metrics(train[:MIN_SCORED_IMAGES], test[:MIN_SCORED_IMAGES], lenet)
    assert all(math.isfinite(m[k]) for k in ("fid", "kid", "precision", "recall"))
    with pytest.raises(ValueError, match=f"at least {MIN_SCORED_IMAGES} images"):
        metrics(train[:MIN_SCORED_IMAGES - 1], test, lenet)


def test_evaluate_refuses_too_few_images_before_any_work(real, tmp_path):
    """Refused before the dataset is even looked for (its source here does not exist)."""
    data = DataConfig(source=str(tmp_path / "nowhere"), data_dir=str(tmp_path / "data"))
    with pytest.raises(ConfigError, match=f"at least {MIN_SCORED_IMAGES}"):
        evaluate(real[0][:MIN_SCORED_IMAGES - 1], data=data, progress=False, device="cpu")
    assert not (tmp_path / "data").exists()


# --- evaluate(), the reference cache, the CLI ---------------------------------------------------------------------

def test_evaluate_reuses_the_cached_reference_statistics(smoke_run, data_dir, prepared, lenet, tmp_path):
    loaded = load_model(smoke_run)  # its config names the session's data folder
    settings = dict(num_samples=64, sampler="ddim", steps=5, batch_size=32, progress=False)
    first = evaluate(loaded, **settings)
    key = f"mnist-{prepared.sha256[:12]}-test-{lenet.extractor_id}"
    cached = sorted((data_dir / "reference_stats").glob(f"{key}.safetensors"))
    assert len(cached) == 1  # the test split's features
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cached}  # a rewrite would change both

    second = evaluate(loaded, **settings, out=tmp_path / "metrics.json")
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cached} == stamps
    for key in ("fid_lenet_ddim5", "kid_lenet_ddim5", "kid_std_lenet_ddim5", "precision_lenet_ddim5",
                "recall_lenet_ddim5", "confident_fraction_lenet_ddim5", "class_entropy_lenet_ddim5"):
        assert math.isfinite(second[key]) and second[key] == first[key], key
    assert second["extractor_id"] == lenet.extractor_id
    assert second["num_samples"] == 64 and second["dataset_sha256"] == prepared.sha256
    assert second["sampling_images_per_s"] > 0
    assert 0 <= second["class_entropy_lenet_ddim5"] <= math.log(10) + 1e-9
    assert json.loads((tmp_path / "metrics.json").read_text()) == second


def test_class_conditional_metrics_on_real_images(prepared, data_dir, lenet):
    """Real test images with their true labels are consistent with them and close to each class;
    the same images with labels shifted by one are neither."""
    from diffusion_core.config import DataConfig

    images, labels = prepared.load("test")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(3))[:400]
    images, labels = images[pick], labels[pick]
    data = DataConfig(source=str(prepared.path.parent), data_dir=str(data_dir))
    true = evaluate(images, labels=labels, data=data, tag="real", progress=False)
    wrong = evaluate(images, labels=(labels + 1) % 10, data=data, tag="real", progress=False)
    assert true["class_consistency_lenet_real"] > 0.97  # the classifier's test accuracy is 99 %
    assert wrong["class_consistency_lenet_real"] < 0.03
    assert true["fid_lenet_real"] == wrong["fid_lenet_real"]  # overall FID ignores the labels
    per_class = [true[f"fid_lenet_real_class{c}"] for c in range(10)]
    assert true["fid_lenet_real_classmean"] == pytest.approx(sum(per_class) / 10)
    assert true["fid_lenet_real_classmean"] * 5 < wrong["fid_lenet_real_classmean"]
    with pytest.raises(ValueError, match="one per image"):
        evaluate(images, labels=labels[:10], data=data, progress=False)


def test_cli_evaluate_with_floors(smoke_run, mnist_raw_source, data_dir, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    main(["evaluate", "--model", str(smoke_run), "-n", "32", "--steps", "3", "--floors", "--out", str(out),
          "--data-source", str(mnist_raw_source), "--data-dir", str(data_dir), "--device", "cpu"])
    table = capsys.readouterr().out
    assert all(row in table for row in ("ddim3", "train", "noise"))
    result = json.loads(out.read_text())
    assert result["num_samples"] == 32
    assert result["fid_lenet_train"] * 5 < result["fid_lenet_noise"]
    assert result["class_entropy_lenet_train"] > result["class_entropy_lenet_noise"]


def test_cli_evaluate_without_model_or_floors_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate"])
    assert exc.value.code == 2 and "--model" in capsys.readouterr().err


# --- crafted files where the evaluation reads: refused (or never read), never run ----------------------------------

class _RunsCode:
    """Unpickling this creates `marker`: what a crafted cache or weights file would do with its code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _plant(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"mu": _RunsCode(marker)}, path)


@pytest.fixture()
def private_data(prepared, tmp_path):
    """A data folder of its own holding a copy of the canonical file, for tests that plant files in it."""
    from diffusion_core.config import DataConfig
    from diffusion_core.data import canonical_path

    target = canonical_path(prepared.spec, tmp_path / "data")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(prepared.path, target)
    return DataConfig(source="download", data_dir=str(tmp_path / "data"))


def test_crafted_reference_cache_files_are_never_run(prepared, lenet, real, private_data, tmp_path, monkeypatch):
    """torch-fidelity's cache names (its pickle cache, on by default) are never read; a crafted file at
    the project's own cache name is refused, naming the file."""
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    stats = Path(private_data.data_dir) / "reference_stats"
    key = f"mnist-{prepared.sha256[:12]}-test-{lenet.extractor_id}"
    fidelity_names = [f"{key}-lenet-mnist-features-fc1.pt", f"{key}-lenet-mnist-stat-fid-fc1.pt"]
    for name in fidelity_names:
        _plant(stats / name, marker)
        _plant(tmp_path / "torch" / "fidelity_cache" / name, marker)
    images = real[0][:64]
    first = evaluate(images, data=private_data, progress=False)
    assert not marker.exists()
    assert first == evaluate(images, data=private_data, progress=False)  # from the project's own cache now
    own = stats / f"{key}.safetensors"
    _plant(own, marker)
    with pytest.raises(RuntimeError, match=f"{own}.*delete it"):
        evaluate(images, data=private_data, progress=False)
    assert not marker.exists()


def test_crafted_inception_weights_are_refused_without_running(prepared, private_data, tmp_path, offline,
                                                               monkeypatch):
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("DIFFUSION_INCEPTION_WEIGHTS", raising=False)
    explicit = tmp_path / INCEPTION_FILE
    _plant(explicit, marker)
    with pytest.raises(RuntimeError, match="not a plain PyTorch state dict"):
        resolve_extractor("inception", prepared, private_data.data_dir, inception_weights=explicit)
    _plant(tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE, marker)  # the hub cache: hash checked first
    with pytest.raises(RuntimeError, match="not the published 6726825d"):
        resolve_extractor("inception", prepared, private_data.data_dir)
    assert not marker.exists()


# --- the Inception path -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A randomly initialised state dict with the exact keys and shapes of torch-fidelity's Inception-v3,
    saved the way torch-fidelity's weights are (torch.save of a state dict)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    patch = pytest.MonkeyPatch()
    patch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})  # build only; no download, no loading
    patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    try:
        torch.manual_seed(0)
        net = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        patch.undo()
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return path


def test_inception_runs_offline_with_a_local_weights_file(inception_weights, prepared, data_dir, real, offline,
                                                           monkeypatch):
    train, test = real
    extractor = resolve_extractor("inception", prepared, data_dir, inception_weights=inception_weights)
    assert extractor.extractor_id == f"inception-v3-compat-{file_sha256(inception_weights)[:12]}"
    m = metrics(train[:4], test[:4], extractor)
    assert all(math.isfinite(v) for v in m.values()), m
    monkeypatch.setenv("DIFFUSION_INCEPTION_WEIGHTS", str(inception_weights))
    assert resolve_extractor("inception-v3-compat", prepared, data_dir).extractor_id == extractor.extractor_id


def test_inception_offline_without_weights_fails_before_sampling(smoke_run, tmp_path, offline, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("DIFFUSION_INCEPTION_WEIGHTS", raising=False)
    loaded = load_model(smoke_run)
    calls = []
    loaded.denoiser.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(RuntimeError) as exc:
        evaluate(loaded, extractor="inception", num_samples=8, steps=2, progress=False)
    message = str(exc.value)
    assert INCEPTION_FILE in message and str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "--inception-weights" in message and "DIFFUSION_INCEPTION_WEIGHTS" in message
    assert calls == []


def test_plots_read_the_metric_keys(tmp_path):
    from diffusion_core.evaluation.plots import fid_by_nfe, guidance_sweep, plot_fid_vs_nfe, plot_guidance_sweep

    metrics = {"fid_lenet_ddim50": 60.0, "fid_lenet_ddim10": 90.0, "fid_lenet_dpmpp2m10": 70.0,
               "fid_lenet_ddpm1000": 55.0, "fid_lenet_ddim10_w3": 1.0, "kid_lenet_ddim50": 0.1,
               "fid_lenet_dpmpp2msde20": 50.0,
               "fid_lenet_train": 7.0, "fid_inception_ddim10": 5.0}
    assert fid_by_nfe(metrics, "lenet") == {"ddim": [(10, 90.0), (50, 60.0)], "ddpm": [(1000, 55.0)],
                                            "dpmpp2m": [(10, 70.0)], "dpmpp2msde": [(20, 50.0)]}
    assert fid_by_nfe(metrics, "lenet", 3.0) == {"ddim": [(10, 1.0)]}
    assert plot_fid_vs_nfe(metrics, "lenet", tmp_path / "nfe.png", 64).stat().st_size > 1000
    assert plot_fid_vs_nfe(metrics, "lenet", tmp_path / "none.png", 64, 3.0) is None  # one point is no curve

    guided = {"fid_lenet_ddim50_w0": 60.0, "fid_lenet_ddim50_w3": 80.0, "class_consistency_lenet_ddim50_w3": 0.9,
              "class_consistency_lenet_ddim50_w0": 0.7, "fid_lenet_ddim50_w3_class1": 3.0}
    assert guidance_sweep(guided, "lenet", "ddim50") == [(0.0, {"fid": 60.0, "class_consistency": 0.7}),
                                                         (3.0, {"fid": 80.0, "class_consistency": 0.9})]
    assert plot_guidance_sweep(guided, "lenet", "ddim50", tmp_path / "sweep.png", 64).is_file()
    with pytest.raises(ValueError, match="no sample count for 'ddim50_w3'"):
        plot_guidance_sweep(guided, "lenet", "ddim50", tmp_path / "sweep.png", {"ddim50_w0": 64})


def _lines_by_size(ax, size_of_point: dict[tuple[float, float], int]) -> list[tuple[str, set[int]]]:
    """(legend label, the N of every point on it) for each line drawn on `ax`."""
    return [(line.get_label(), {size_of_point[(float(x), float(y))] for x, y in zip(*line.get_data())})
            for line in ax.lines]


def test_plots_never_join_points_of_different_n():
    """The pipeline scores its primary setting at evaluation.num_samples and the sweeps at
    sample.num_samples: FID's bias differs between them, so each N is its own line, named in the legend."""
    from diffusion_core.evaluation.plots import draw_fid_vs_nfe, draw_guidance_sweep

    nfe = {"fid_lenet_dpmpp2msde50_w0": 7.0, "fid_lenet_dpmpp2msde20_w0": 40.0, "fid_lenet_dpmpp2msde10_w0": 60.0,
           "fid_lenet_ddim20_w0": 45.0, "fid_lenet_ddim10_w0": 70.0, "fid_lenet_ddim50_w0": 50.0}
    sizes = {"dpmpp2msde50_w0": 1000, "dpmpp2msde20_w0": 64, "dpmpp2msde10_w0": 64, "ddim20_w0": 64,
             "ddim10_w0": 64, "ddim50_w0": 1000}
    size_of_point = {(50.0, 7.0): 1000, (20.0, 40.0): 64, (10.0, 60.0): 64, (20.0, 45.0): 64, (10.0, 70.0): 64,
                     (50.0, 50.0): 1000}  # (network evaluations, FID) → N, as in `sizes`
    lines = _lines_by_size(draw_fid_vs_nfe(nfe, "lenet", sizes, 0.0).axes[0], size_of_point)
    assert sorted((label, tuple(ns)) for label, ns in lines) == [
        ("DDIM (η = 0), N = 1,000", (1000,)), ("DDIM (η = 0), N = 64", (64,)),
        ("SDE-DPM-Solver++(2M), N = 1,000", (1000,)), ("SDE-DPM-Solver++(2M), N = 64", (64,))]

    sweep = {"fid_lenet_ddim50_w0": 7.0, "fid_lenet_ddim50_w0.5": 30.0, "fid_lenet_ddim50_w1": 40.0,
             "class_consistency_lenet_ddim50_w0": 0.97, "class_consistency_lenet_ddim50_w0.5": 0.98,
             "class_consistency_lenet_ddim50_w1": 0.99}
    sizes = {"ddim50_w0": 1000, "ddim50_w0.5": 64, "ddim50_w1": 64}
    fid_axes, consistency_axes = draw_guidance_sweep(sweep, "lenet", "ddim50", sizes).axes
    assert sorted(_lines_by_size(fid_axes, {(0.0, 7.0): 1000, (0.5, 30.0): 64, (1.0, 40.0): 64})) == [
        ("all classes, N = 1,000", {1000}), ("all classes, N = 64", {64})]
    assert sorted(_lines_by_size(consistency_axes, {(0.0, 0.97): 1000, (0.5, 0.98): 64, (1.0, 0.99): 64})) == [
        ("class consistency, N = 1,000", {1000}), ("class consistency, N = 64", {64})]


PLOTS_OFF_THE_MAIN_THREAD = """
import json, sys, threading
from pathlib import Path
from diffusion_core.evaluation.plots import plot_fid_vs_nfe
from diffusion_core.train import plot_loss_curve
out = Path(sys.argv[1])
(out / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1 / i}) + "\\n" for i in range(1, 9)))
def draw():
    plot_loss_curve(out / "metrics.jsonl", out / "loss.png")
    plot_fid_vs_nfe({"fid_lenet_ddim10": 9.0, "fid_lenet_ddim20": 7.0}, "lenet", out / "nfe.png", 64)
thread = threading.Thread(target=draw)
thread.start(); thread.join()
print(json.dumps(sorted(m for m in sys.modules if m == "IPython" or m.startswith("matplotlib.pyplot"))))
"""


def test_plots_touch_no_global_gui_state_from_any_thread(tmp_path):
    """Training plots while MLflow's metrics thread runs. pyplot's first figure resolves a backend and,
    with IPython importable, imports it: two such imports racing failed real runs. The plots must use
    bare Figures: drawn from a worker thread, neither pyplot nor IPython is ever loaded."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", PLOTS_OFF_THE_MAIN_THREAD, str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "MPLBACKEND": ""})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "nfe.png").stat().st_size > 1000
