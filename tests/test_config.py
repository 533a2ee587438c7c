import pytest

from diffusion_core import ConfigError, load_config
from diffusion_core.config import PRESET_DIR


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
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("smoke", [override], environ={})


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="mnist-cpu"):
        load_config("nope", environ={})
