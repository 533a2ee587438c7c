"""The `diffusion` command as a user runs it (in a subprocess)."""

import subprocess
import sys

import torch
from PIL import Image
from safetensors.torch import load_file


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "diffusion_core.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_sample_grid_and_tensor(smoke_run, tmp_path):
    grid, tensor = tmp_path / "grid.png", tmp_path / "samples.safetensors"
    result = run_cli("sample", "--model", str(smoke_run), "--sampler", "ddim", "--steps", "5", "-n", "6",
                     "--seed", "1", "--out", str(grid), "--tensor-out", str(tensor), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    images = load_file(str(tensor))["images"]
    assert images.shape == (6, 1, 28, 28) and str(images.dtype) == "torch.uint8"
    assert Image.open(grid).size[0] > 28
    again = tmp_path / "again.safetensors"
    assert run_cli("sample", "--model", str(smoke_run), "--steps", "5", "-n", "6", "--seed", "1",
                   "--tensor-out", str(again), "--device", "cpu").returncode == 0
    assert (load_file(str(again))["images"] == images).all()  # same seed, same images


def test_ddpm_sampling_from_cli(smoke_run, tmp_path):
    tensor = tmp_path / "ddpm.safetensors"
    result = run_cli("sample", "--model", str(smoke_run), "--sampler", "ddpm", "-n", "2",
                     "--tensor-out", str(tensor), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert load_file(str(tensor))["images"].shape == (2, 1, 28, 28)


def test_sampler_asked_for_takes_its_own_default_steps_and_spacing(smoke_run, tmp_path):
    """The smoke config samples DDIM with 10 steps even in t; --sampler dpm++2m-sde without --spacing takes
    log-SNR steps (its default, the same rule as the library's), and --sampler ddpm all T steps."""
    import dataclasses

    from safetensors import safe_open

    from diffusion_core.checkpoint import load_model
    from diffusion_core.config import SampleConfig
    from diffusion_core.samplers import generate_batches

    model = load_model(smoke_run)
    assert (model.config.sample.sampler, model.config.sample.steps) == ("ddim", 10)
    tensor = tmp_path / "sde.safetensors"
    result = run_cli("sample", "--model", str(smoke_run), "--sampler", "dpm++2m-sde", "--steps", "4", "-n", "3",
                     "--seed", "2", "--tensor-out", str(tensor), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    with safe_open(str(tensor), "pt") as f:
        assert (f.metadata()["sampler"], f.metadata()["spacing"]) == ("dpm++2m-sde", "log_snr")
    settings = SampleConfig(sampler="dpm++2m-sde", steps=4, spacing="log_snr", num_samples=3, seed=2)
    expected = torch.cat(list(generate_batches(model.denoiser, model.denoiser.schedule, (1, 28, 28), settings,
                                               device="cpu", progress=False)))
    assert (load_file(str(tensor))["images"] == expected).all()
    noisier = tmp_path / "sde-noise3.safetensors"
    result = run_cli("sample", "--model", str(smoke_run), "--sampler", "dpm++2m-sde", "--steps", "4", "-n", "3",
                     "--seed", "2", "--sde-noise", "3", "--tensor-out", str(noisier), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    expected = torch.cat(list(generate_batches(model.denoiser, model.denoiser.schedule, (1, 28, 28),
                                               dataclasses.replace(settings, sde_noise=3.0), device="cpu",
                                               progress=False)))
    assert (load_file(str(noisier))["images"] == expected).all()
    assert not (expected == load_file(str(tensor))["images"]).all()
    refused = run_cli("sample", "--model", str(smoke_run), "--sde-noise", "3", "-n", "1", "--device", "cpu")
    assert refused.returncode != 0 and "a setting of the dpm++2m-sde sampler, not of 'ddim'" in refused.stderr
    ddpm = tmp_path / "ddpm.safetensors"
    assert run_cli("sample", "--model", str(smoke_run), "--sampler", "ddpm", "-n", "1", "--tensor-out", str(ddpm),
                   "--device", "cpu").returncode == 0
    with safe_open(str(ddpm), "pt") as f:
        assert (f.metadata()["steps"], f.metadata()["spacing"]) == ("100", "linear")


def test_bad_input_gives_clear_errors(smoke_run, tmp_path):
    result = run_cli("sample", "--model", str(smoke_run), "--steps", "5000", "--device", "cpu")
    assert result.returncode == 2 and "exceeds the model's 100 timesteps" in result.stderr
    result = run_cli("sample", "--model", str(smoke_run), "--eta", "3", "--device", "cpu")
    assert result.returncode == 2 and "eta must be in [0, 1]" in result.stderr
    result = run_cli("train", "--preset", "smoke", "--set", "train.batch_size=0", "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 2 and "train.batch_size must be >= 1" in result.stderr
    assert not (tmp_path / "r").exists()  # rejected before any work
    result = run_cli("sample", "--model", str(tmp_path / "missing"))
    assert result.returncode == 1 and "no checkpoint at" in result.stderr


def test_class_conditional_sampling_from_cli(smoke_cond_run, smoke_run, tmp_path):
    grid, tensor = tmp_path / "digits.png", tmp_path / "digits.safetensors"
    result = run_cli("sample", "--model", str(smoke_cond_run), "--class", "all", "--guidance", "3", "-n", "30",
                     "--steps", "4", "--out", str(grid), "--tensor-out", str(tensor), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    saved = load_file(str(tensor))
    assert saved["images"].shape == (30, 1, 28, 28)
    assert saved["labels"].tolist() == [c for c in range(10) for _ in range(3)]  # one grid row per class
    width, height = Image.open(grid).size
    assert height > 3 * width  # 10 rows of 3
    one = run_cli("sample", "--model", str(smoke_cond_run), "--class", "7", "-n", "2", "--steps", "4",
                  "--tensor-out", str(tmp_path / "seven.safetensors"), "--device", "cpu")
    assert one.returncode == 0 and load_file(str(tmp_path / "seven.safetensors"))["labels"].tolist() == [7, 7]
    # No --class: every class equally often, as the pipeline samples it; --class none: the unconditional mode.
    default = run_cli("sample", "--model", str(smoke_cond_run), "-n", "12", "--steps", "4",
                      "--tensor-out", str(tmp_path / "default.safetensors"), "--device", "cpu")
    assert default.returncode == 0, default.stderr
    assert sorted(load_file(str(tmp_path / "default.safetensors"))["labels"].tolist()) == sorted(
        [0, 1] + list(range(10)))  # 12 images: each class once, 0 and 1 twice
    none = run_cli("sample", "--model", str(smoke_cond_run), "--class", "none", "-n", "2", "--steps", "4",
                   "--tensor-out", str(tmp_path / "none.safetensors"), "--device", "cpu")
    assert none.returncode == 0 and "labels" not in load_file(str(tmp_path / "none.safetensors"))

    refused = run_cli("sample", "--model", str(smoke_run), "--class", "7", "--guidance", "3", "--device", "cpu")
    assert refused.returncode == 2 and "unconditional" in refused.stderr
    refused = run_cli("sample", "--model", str(smoke_cond_run), "--class", "10", "--device", "cpu")
    assert refused.returncode == 2 and "[0, 9]" in refused.stderr
    refused = run_cli("sample", "--model", str(smoke_cond_run), "--class", "1,2", "-n", "3", "--device", "cpu")
    assert refused.returncode == 2 and "multiple of the 2 classes" in refused.stderr


def test_train_and_prepare_from_cli(mnist_raw_source, tmp_path):
    data = tmp_path / "data"
    common = ["--preset", "smoke", "--set", f"data.source={mnist_raw_source}", "--set", f"data.data_dir={data}"]
    prepared = run_cli("prepare", *common)
    assert prepared.returncode == 0, prepared.stderr
    assert "sha256=" in prepared.stdout and (data / "mnist.safetensors").is_file()
    trained = run_cli("train", *common, "--set", "train.steps=3", "--run-dir", str(tmp_path / "run"))
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """Only errors in what was asked for become one-line messages; an out-of-memory error or a bug's
    ValueError reaches the user with its traceback."""
    import importlib

    import pytest

    from diffusion_core.cli import main

    for error in (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), ValueError("a bug")):
        def fail(*args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(importlib.import_module("diffusion_core.train"), "train", fail)
        with pytest.raises(type(error), match=str(error)):
            main(["train", "--preset", "smoke", "--run-dir", str(tmp_path / "run")])


def test_missing_dependency_keeps_evaluate_listed_and_names_it():
    """Without torch-fidelity importable, `diffusion evaluate` still exists and says what is missing."""
    program = ("import sys; sys.modules['torch_fidelity'] = None\n"  # what a missing package looks like to import
               "from diffusion_core.cli import main; main(sys.argv[1:])")
    listed = subprocess.run([sys.executable, "-c", program, "--help"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "evaluate" in listed.stdout
    run = subprocess.run([sys.executable, "-c", program, "evaluate", "--model", "runs/x", "-n", "8"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "'torch_fidelity'" in run.stderr and "pip install" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
