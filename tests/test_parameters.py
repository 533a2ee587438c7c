"""What a deployment run may ask for: training and sampling settings within bounds, nothing that
reaches the file system, switches the worker process or sizes the work beyond its means; overrides are
checked in their final (dotted) form, so a section table is no way around a bound; each refusal names
the key and what is allowed."""

from __future__ import annotations

import os

import pytest

from diffusion_core.config import PRESET_DIR, ConfigError, load_config
from flows.parameters import BOUNDS, LIST_BOUNDS, PRESET_DIR_ENV, check_distill_overrides, check_run_parameters

SHIPPED = PRESET_DIR / "smoke.toml"
# One value past each bound of flows.parameters, in dotted form; the table form of each is tested too.
PAST_BOUNDS = {"train.steps": 10**9, "train.batch_size": 10**6, "diffusion.timesteps": 10**6,
               "model.base_channels": 4096, "model.num_res_blocks": 64, "model.attention_heads": 512,
               "model.patch_size": 64,
               "sample.num_samples": 10**7, "sample.batch_size": 10**6, "sample.steps": 10**6, "sample.seed": 2**32,
               "train.seed": 2**64,
               "evaluation.num_samples": 10**7, "evaluation.bootstrap": 10**6,
               "model.channel_mults": [1, 2, 2, 2, 2, 2, 2], "model.attention_levels": [0, 1, 2, 3, 4, 5],
               "sample.guidance_sweep": [0.0] * 17, "sample.nfe_sweep": list(range(1, 100)),
               "distill.steps": 10**9, "distill.batch_size": 10**6, "distill.log_every": 0, "distill.ode_steps": 10**6,
               "distill.sample_steps": 10**6, "distill.seed": -1}


def _table(dotted: str, value) -> dict:
    section, key = dotted.split(".")
    return {section: {key: value}}


def test_every_bound_is_covered_by_a_refusal_case():
    assert set(PAST_BOUNDS) == {key for key in (*BOUNDS, *LIST_BOUNDS) if "." in key}


@pytest.mark.parametrize("form", ["dotted", "table"])
@pytest.mark.parametrize("key", sorted(PAST_BOUNDS))
def test_work_sizing_settings_are_bounded_in_either_form(key, form, monkeypatch):
    monkeypatch.delenv(PRESET_DIR_ENV, raising=False)
    overrides = {key: PAST_BOUNDS[key]} if form == "dotted" else _table(key, PAST_BOUNDS[key])
    with pytest.raises(ConfigError, match=rf"parameter {key.replace('.', '[.]')} refused: must be .* from "):
        if key.startswith("distill."):  # a student's settings: distill-eval, train-distill's distill_overrides
            check_distill_overrides(overrides)
        else:
            check_run_parameters("smoke", overrides, 1, None)


@pytest.mark.parametrize("preset, overrides, nproc, num_samples, key", [
    ("smoke", {"data.source": "/srv/attacker"}, 1, None, "data.source"),
    ("smoke", {"data.data_dir": "/tmp/elsewhere"}, 1, None, "data.data_dir"),
    ("smoke", {"data": {"source": "s3://other/bucket"}}, 1, None, "data.source"),
    ("smoke", {"tracking.uri": "http://example.com"}, 1, None, "tracking.uri"),
    ("smoke", {"tracking": {"uri": "http://example.com"}}, 1, None, "tracking.uri"),
    ("smoke", {"train.compile": True}, 1, None, "train.compile"),
    ("smoke", {"train": {"compile": True}}, 1, None, "train.compile"),
    ("smoke", {"train": {"device": "cuda:7"}}, 1, None, "train.device"),
    ("smoke", {"train.steps": 5, "train": {"steps": 10**9}}, 1, None, "train.steps"),  # named twice
    ("smoke", {"train": 5}, 1, None, "train"),
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


def test_training_and_sampling_settings_pass_and_a_table_keeps_the_presets_other_values():
    preset, flat = check_run_parameters(
        "smoke", {"train": {"steps": 500, "lr": 3e-4}, "model.dropout": 0.1, "sample.steps": 20,
                  "diffusion.timesteps": 200, "data.dataset": "mnist", "name": "nightly-7",
                  "evaluation": {"num_samples": 2000}, "model": {"channel_mults": [1, 2]}}, "auto", 1000)
    assert flat == {"train.steps": 500, "train.lr": 3e-4, "model.dropout": 0.1, "sample.steps": 20,
                    "diffusion.timesteps": 200, "data.dataset": "mnist", "name": "nightly-7",
                    "evaluation.num_samples": 2000, "model.channel_mults": [1, 2]}
    config, smoke = load_config(preset, flat), load_config("smoke")
    assert config.train.batch_size == smoke.train.batch_size and config.train.warmup_steps == smoke.train.warmup_steps
    assert config.evaluation.bootstrap == smoke.evaluation.bootstrap
    check_run_parameters("mnist-cpu-cond", {}, min(2, os.cpu_count()), None)


def test_preset_files_only_inside_the_allowed_folder(tmp_path, monkeypatch):
    allowed = tmp_path / "presets"
    allowed.mkdir()
    (allowed / "team.toml").write_text('extends = "smoke"\n')
    (tmp_path / "outside.toml").write_text('extends = "smoke"\n')
    monkeypatch.setenv(PRESET_DIR_ENV, str(allowed))
    resolved, _ = check_run_parameters("team.toml", {}, 1, None)
    assert load_config(resolved).train == load_config("smoke").train  # loaded from the allowed folder, not ./
    for escape in ("../outside.toml", str(tmp_path / "outside.toml")):
        with pytest.raises(ConfigError, match=f"preset refused: '{escape}'.*under {PRESET_DIR_ENV}"):
            check_run_parameters(escape, {}, 1, None)


@pytest.mark.parametrize("overrides, key", [
    ({"model.base_channels": 8}, "model.base_channels"),      # the student is its teacher's architecture
    ({"train": {"steps": 5}}, "train.steps"),                 # it does not train as its teacher did
    ({"data.source": "/srv/attacker"}, "data.source"),
    ({"data.dataset": "mnist"}, "data.dataset"),              # its data are its teacher's
    ({"name": "other"}, "name"),
    ({"train.device": "cuda:7"}, "train.device"),
    ({"distill": 5}, "distill"),
])
def test_a_distillation_run_sets_only_its_students_distill_sample_and_evaluation_settings(overrides, key):
    with pytest.raises(ConfigError, match=rf"parameter overrides\['{key.replace('.', '[.]')}'\] refused"):
        check_distill_overrides(overrides)
    assert check_distill_overrides({"distill": {"steps": 3000, "guidance": 0.3}, "sample.batch_size": 128,
                                    "evaluation.num_samples": 2000}) == {
        "distill.steps": 3000, "distill.guidance": 0.3, "sample.batch_size": 128, "evaluation.num_samples": 2000}
