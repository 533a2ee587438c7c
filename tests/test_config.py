import re

import pytest

from diffusion_core import ConfigError, load_config
from diffusion_core.config import MIN_SCORED_IMAGES, PRESET_DIR, SampleConfig, config_from_dict


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.toml")))
def test_presets_load(preset):
    config = load_config(preset, environ={})
    assert config.name == preset


def test_override_precedence():
    config = load_config("smoke", ["train.lr=0.5", "sample.sampler=ddpm"],
                         environ={"DIFFUSION_DATA_SOURCE": "/somewhere"})
    assert config.train.lr == 0.5 and config.sample.sampler == "ddpm" and config.data.source == "/somewhere"
    assert config.flat()["train.lr"] == 0.5


@pytest.mark.parametrize("override, field", [
    ("train.lr=-1", "train.lr"),
    ("train.batch_size=0", "train.batch_size"),
    ("sample.sampler=euler", "sample.sampler"),
    ("sample.steps=5000", "sample.steps"),
    ("sample.eta=2", "sample.eta"),
    ("diffusion.schedule=quadratic", "diffusion.schedule"),
    ("data.dataset=imagenet", "data.dataset"),
    ("model.channel_mults=[1,2,2,2]", "model.channel_mults"),
    ("model.in_channels=3", "model.in_channels"),
    ("train.lrr=0.1", "train.lrr"),
    ("optimizer.lr=0.1", "optimizer"),
    ("train.steps=ten", "train.steps"),
    ("model.num_classes=7", "model.num_classes"),
    ("train.label_dropout=1.5", "train.label_dropout"),
    ("sample.guidance=-1", "sample.guidance"),
    ("sample.guidance_sweep=[0,-2]", "sample.guidance_sweep"),
    ("evaluation.num_samples=5", "evaluation.num_samples"),
    ("evaluation.bootstrap=3", "evaluation.bootstrap"),
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("smoke", [override], environ={})


@pytest.mark.parametrize("sampling", [
    {"sample.guidance": 2.0, "sample.guidance_sweep": []},
    {"sample.guidance": 0.0},  # the default sweep (0, 1, 3, 5), which the pipeline samples
    {"sample.guidance_sweep": [0.0, 0.5]},
])
def test_guidance_without_label_dropout_is_refused(sampling):
    """A model that never saw the "no class" label has no ε̂(x, ∅) to guide with."""
    with pytest.raises(ConfigError, match=r"train\.label_dropout=0 .*sample\.guidance / sample\.guidance_sweep") as err:
        load_config("smoke", {"model.num_classes": 10, "train.label_dropout": 0.0, **sampling}, environ={})
    assert "set train.label_dropout > 0" in str(err.value) and "sample.guidance_sweep=[]" in str(err.value)


def test_consistency_levels_belong_to_one_step_count_and_one_sampler():
    levels = SampleConfig(sampler="consistency", levels_log_snr=[-4.5, -1.5, 0.5])
    assert levels.levels_log_snr == (-4.5, -1.5, 0.5) and levels.resolved(1000).steps == 4
    assert levels.override(steps=4, seed=3).levels_log_snr == (-4.5, -1.5, 0.5)
    # another step count, a spacing asked for or another sampler: the levels (4 steps' worth) are dropped
    assert levels.override(steps=2).levels_log_snr == levels.override(spacing="linear").levels_log_snr == ()
    assert levels.override(sampler="ddim").levels_log_snr == ()
    for bad, named in (({"sampler": "ddim"}, "a setting of the consistency sampler, not of 'ddim'"),
                       ({"steps": 3}, "sample.steps=3 with 3 sample.levels_log_snr"),
                       ({"levels_log_snr": [0.5, -1.5]}, "must increase")):
        with pytest.raises(ConfigError, match=re.escape(named)):
            SampleConfig(**{"sampler": "consistency", "levels_log_snr": [-4.5, -1.5, 0.5], **bad})


def test_sde_noise_belongs_to_the_sde_sampler():
    noisy = SampleConfig(sampler="dpm++2m-sde", sde_noise=2.0)
    assert noisy.override(steps=15).sde_noise == 2.0 and noisy.override(sampler="ddim").sde_noise == 1.0
    for bad, named in (({"sampler": "dpm++2m"}, "sample.sde_noise=2.0 is a setting of the dpm++2m-sde sampler, "
                                               "not of 'dpm++2m'"),
                       ({"sde_noise": 0.0}, "sample.sde_noise must be > 0 (for no noise use sampler dpm++2m)")):
        with pytest.raises(ConfigError, match=re.escape(named)):
            SampleConfig(**{"sampler": "dpm++2m-sde", "sde_noise": 2.0, **bad})


def test_label_dropout_0_is_fine_without_guidance():
    unguided = load_config("smoke", {"model.num_classes": 10, "train.label_dropout": 0.0,
                                     "sample.guidance_sweep": [0.0]}, environ={})
    unconditional = load_config("smoke", {"train.label_dropout": 0.0}, environ={})  # no sweep is sampled
    assert unguided.train.label_dropout == unconditional.train.label_dropout == 0.0


@pytest.mark.parametrize("num_samples", [1, MIN_SCORED_IMAGES - 1])
def test_too_few_samples_to_score_are_refused(num_samples):
    with pytest.raises(ConfigError, match=rf"sample\.num_samples={num_samples} .* at least {MIN_SCORED_IMAGES}"):
        load_config("smoke", {"sample.num_samples": num_samples}, environ={})
    assert load_config("smoke", {"sample.num_samples": MIN_SCORED_IMAGES}, environ={}).sample.num_samples == 4


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="mnist-cpu"):
        load_config("nope", environ={})


def test_preset_extends_another(tmp_path):
    base, cond = load_config("mnist-cpu", environ={}), load_config("mnist-cpu-cond", environ={})
    assert cond.conditional and not base.conditional and cond.model.num_classes == 10
    assert cond.train == base.train and cond.model.base_channels == base.model.base_channels  # inherited
    (tmp_path / "a.toml").write_text('extends = "{}"\n'.format(tmp_path / "b.toml"))
    (tmp_path / "b.toml").write_text('extends = "{}"\n'.format(tmp_path / "a.toml"))
    with pytest.raises(ConfigError, match="loop"):
        load_config(str(tmp_path / "a.toml"), environ={})


def test_a_table_override_changes_only_the_settings_it_names():
    preset = load_config("smoke", environ={})
    config = load_config("smoke", {"train": {"steps": 7}}, environ={})
    assert config.train.steps == 7
    assert config.train.batch_size == preset.train.batch_size and config.train.lr == preset.train.lr  # kept


def test_the_promotion_rule_is_not_a_run_setting_but_old_records_still_load():
    for key in ("evaluation.promotion_sigmas", "evaluation.min_improvement"):
        with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')} is no longer a config setting.*flows.gate"):
            load_config("smoke", {key: 0.0}, environ={})
    record = load_config("smoke", environ={}).to_dict()
    record["evaluation"].update(promotion_sigmas=0.0, min_improvement=0.0)  # a config.json written before the gate
    assert config_from_dict(record) == load_config("smoke", environ={})
