"""What a deployment run may ask for: training and sampling settings within bounds, nothing that
reaches the file system or sizes the worker beyond its means; each refusal names the key."""

from __future__ import annotations

import os

import pytest

from diffusion_core.config import PRESET_DIR, ConfigError, load_config
from flows.parameters import PRESET_DIR_ENV, check_run_parameters

SHIPPED = PRESET_DIR / "smoke.toml"


@pytest.mark.parametrize("preset, overrides, nproc, num_samples, key", [
    ("smoke", {"data.source": "/srv/attacker"}, 1, None, "data.source"),
    ("smoke", {"data.data_dir": "/tmp/elsewhere"}, 1, None, "data.data_dir"),
    ("smoke", {"data": {"source": "s3://other/bucket"}}, 1, None, "'data'"),
    ("smoke", {"tracking.uri": "http://example.com"}, 1, None, "tracking.uri"),
    ("smoke", {"train.steps": 10**9}, 1, None, "train.steps"),
    ("smoke", {"sample.num_samples": 10**7}, 1, None, "sample.num_samples"),
    ("smoke", {"evaluation.num_samples": 10**7}, 1, None, "evaluation.num_samples"),
    ("smoke", {"evaluation.bootstrap": 10**6}, 1, None, "evaluation.bootstrap"),
    ("smoke", {"sample.nfe_sweep": list(range(1, 100))}, 1, None, "sample.nfe_sweep"),
    ("smoke", {"name": "../../escape"}, 1, None, "name"),
    ("smoke", {}, 10_000, None, "nproc_per_node"),
    ("smoke", {}, "-1", None, "nproc_per_node"),
    ("smoke", {}, 1, 10**9, "num_samples"),
    (str(SHIPPED), {}, 1, None, "preset"),                   # a path, even to a shipped file
    ("/etc/passwd", {}, 1, None, "preset"),
    ("../diffusion_core/presets/smoke", {}, 1, None, "preset"),
])
def test_refused_parameters_name_their_key(preset, overrides, nproc, num_samples, key, monkeypatch):
    monkeypatch.delenv(PRESET_DIR_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"parameter .*{key}.* refused"):
        check_run_parameters(preset, overrides, nproc, num_samples)


def test_training_and_sampling_settings_pass():
    check_run_parameters("smoke", {"train.steps": 500, "train.lr": 3e-4, "model.dropout": 0.1, "sample.steps": 20,
                                   "diffusion.timesteps": 200, "data.dataset": "mnist", "name": "nightly-7",
                                   "evaluation.num_samples": 2000, "evaluation.promotion_sigmas": 3.0},
                         "auto", 1000)
    check_run_parameters("mnist-cpu-cond", {}, min(2, os.cpu_count()), None)


def test_preset_files_only_inside_the_allowed_folder(tmp_path, monkeypatch):
    allowed = tmp_path / "presets"
    allowed.mkdir()
    (allowed / "team.toml").write_text('extends = "smoke"\n')
    (tmp_path / "outside.toml").write_text('extends = "smoke"\n')
    monkeypatch.setenv(PRESET_DIR_ENV, str(allowed))
    resolved = check_run_parameters("team.toml", {}, 1, None)
    assert load_config(resolved).train == load_config("smoke").train  # loaded from the allowed folder, not ./
    for escape in ("../outside.toml", str(tmp_path / "outside.toml")):
        with pytest.raises(ConfigError, match=f"preset refused: '{escape}'.*under {PRESET_DIR_ENV}"):
            check_run_parameters(escape, {}, 1, None)
