import importlib
import json
import math
import pickle

import pytest
import torch
from safetensors.torch import load_file

from diffusion_core import ConfigError, TrainingDiverged, load_config, load_model, train
from diffusion_core.checkpoint import CheckpointError, build_denoiser, load_training_checkpoint
from diffusion_core.train import ContinuationMismatch, GlobalBatches, LearningRatePlan, learning_rate


def test_smoke_run_writes_everything(smoke_run):
    for name in ["checkpoints/last.safetensors", "model/model.safetensors", "model/config.json",
                 "metrics.jsonl", "forward_process.png", "loss_curve.png"]:
        assert (smoke_run / name).is_file(), name
    rows = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    info = json.loads((smoke_run / "model" / "config.json").read_text())
    assert info["step"] == 20 and len(info["dataset_sha256"]) == 64


def test_exported_model_is_the_ema(smoke_run):
    state = load_training_checkpoint(smoke_run / "checkpoints" / "last.safetensors")
    exported = load_file(str(smoke_run / "model" / "model.safetensors"))
    assert all(torch.equal(exported[k], state.ema[k]) for k in exported)
    assert any(not torch.equal(state.ema[k], state.model[k]) for k in exported)


def test_real_mnist_loss_decreases(smoke_overrides, tmp_path):
    config = load_config("smoke", {**smoke_overrides, "train.steps": 60, "train.log_every": 10,
                                   "train.checkpoint_every": 60})
    train(config, tmp_path, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.6 * losses[0], losses


def test_exact_resume(smoke_overrides, tmp_path):
    """Train N steps = train k, save, load, train N - k: identical weights, EMA and optimizer on CPU."""
    base = {**smoke_overrides, "train.steps": 12, "train.checkpoint_every": 5, "model.dropout": 0.1}
    straight = tmp_path / "straight"
    train(load_config("smoke", base), straight, progress=False)
    split = tmp_path / "split"
    train(load_config("smoke", {**base, "train.steps": 5}), split, progress=False)
    train(load_config("smoke", base), split, progress=False)  # resumes from step 5
    a = load_training_checkpoint(straight / "checkpoints" / "last.safetensors")
    b = load_training_checkpoint(split / "checkpoints" / "last.safetensors")
    assert a.step == b.step == 12
    for part in ("model", "ema"):
        for key in getattr(a, part):
            assert torch.equal(getattr(a, part)[key], getattr(b, part)[key]), (part, key)
    assert all(torch.equal(a.optimizer["state"][i]["exp_avg"], b.optimizer["state"][i]["exp_avg"])
               for i in a.optimizer["state"])


class Crash(Exception):
    pass


def test_exact_resume_mid_run_with_the_recipe_options(smoke_overrides, tmp_path):
    """A run that decays its learning rate over its whole length, draws t by log SNR, weights its
    loss, predicts v and keeps a power-function EMA, crashed after its step-5 checkpoint (at step 10)
    and resumed, ends with the same weights, EMA and optimizer state as an uninterrupted run."""
    config = load_config("smoke", {**smoke_overrides, "train.steps": 12, "train.checkpoint_every": 5,
                                   "train.lr_decay": "cosine", "train.noise_levels": "log_snr_normal",
                                   "train.loss_weighting": "min_snr", "train.ema_std": 0.1,
                                   "diffusion.prediction": "v"})
    train(config, tmp_path / "straight", progress=False)

    def crash_at_step_10(step, metrics):
        if step == 10:
            raise Crash

    with pytest.raises(Crash):
        train(config, tmp_path / "split", progress=False, on_metrics=crash_at_step_10)
    assert load_training_checkpoint(tmp_path / "split" / "checkpoints" / "last.safetensors").step == 5
    train(config, tmp_path / "split", progress=False)
    a = load_training_checkpoint(tmp_path / "straight" / "checkpoints" / "last.safetensors")
    b = load_training_checkpoint(tmp_path / "split" / "checkpoints" / "last.safetensors")
    assert a.step == b.step == 12
    for part in ("model", "ema"):
        for key in getattr(a, part):
            assert torch.equal(getattr(a, part)[key], getattr(b, part)[key]), (part, key)


def test_stratified_noise_levels_reach_the_objective(smoke_overrides, tmp_path, monkeypatch):
    """train.stratified_noise_levels: every batch the objective sees holds one t in each 1/16 of the smoke
    schedule's 100 levels (sorted, 100·i/16 − 1 < t_i < 100·(i + 1)/16). Independent draws of 16 do that
    with chance 16!/16¹⁶ ≈ 1e-6 per batch."""
    training = importlib.import_module("diffusion_core.train")  # the module; the package exports train()

    seen = []

    class Recording(training.TrainingObjective):
        def forward(self, x0, t, noise, **cond):
            seen.append(t.clone())
            return super().forward(x0, t, noise, **cond)

    monkeypatch.setattr(training, "TrainingObjective", Recording)
    config = load_config("smoke", {**smoke_overrides, "train.steps": 3, "train.checkpoint_every": 3,
                                   "train.stratified_noise_levels": True})
    train(config, tmp_path, progress=False)
    assert len(seen) == 3
    i = torch.arange(16)
    for t in seen:
        t = t.sort().values
        assert ((t > 100 * i / 16 - 1) & (t < 100 * (i + 1) / 16)).all(), t


def test_resume_with_other_settings_is_refused(smoke_run, smoke_overrides):
    config = load_config("smoke", {**smoke_overrides, "train.lr": 0.5, "train.steps": 30})
    with pytest.raises(ConfigError, match="train.lr"):
        train(config, smoke_run, progress=False)


def _other_dataset_version(data_dir, folder):
    """MNIST with one training pixel changed, prepared in `folder`: another version. Returns its sha256."""
    from safetensors.torch import save_file

    from diffusion_core.data import canonical_path, content_sha256, get_spec, read_metadata

    original = canonical_path(get_spec("mnist"), data_dir)
    tensors = load_file(str(original))
    tensors["train.images"][0, 0, 0, 0] ^= 1
    other_sha = content_sha256(tensors)
    folder.mkdir()
    save_file(tensors, str(canonical_path(get_spec("mnist"), folder)),
              metadata={**read_metadata(original), "sha256": other_sha})
    return other_sha


def test_resume_on_another_dataset_version_is_refused(smoke_run, smoke_overrides, data_dir, tmp_path):
    """The same dataset name with one pixel changed is another version: resuming names both sha256s."""
    other_dir = tmp_path / "data"
    other_sha = _other_dataset_version(data_dir, other_dir)
    trained_on = json.loads((smoke_run / "model" / "config.json").read_text())["dataset_sha256"]
    config = load_config("smoke", {**smoke_overrides, "data.data_dir": str(other_dir), "train.steps": 30})
    with pytest.raises(ConfigError, match=f"{trained_on}.*{other_sha}"):
        train(config, smoke_run, progress=False)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(smoke_overrides, tmp_path, monkeypatch):
    """A fault injected into the loss from the 8th step on: training stops at the next report with
    the step named, and the checkpoint of step 5 stays as it was and loadable."""
    from diffusion_core.denoiser import Denoiser

    real_loss, calls = Denoiser.loss, []

    def loss_that_turns_nan(self, *args, **kwargs):
        calls.append(1)
        value = real_loss(self, *args, **kwargs)
        return value * float("nan") if len(calls) >= 8 else value

    monkeypatch.setattr(Denoiser, "loss", loss_that_turns_nan)
    config = load_config("smoke", {**smoke_overrides, "train.steps": 15, "train.checkpoint_every": 5})
    with pytest.raises(TrainingDiverged, match="non-finite loss at step 8"):
        train(config, tmp_path, progress=False)
    state = load_training_checkpoint(tmp_path / "checkpoints" / "last.safetensors")
    assert state.step == 5
    assert all(torch.isfinite(v).all() for v in state.model.values())
    monkeypatch.undo()
    assert load_model(tmp_path / "checkpoints" / "last.safetensors").config.train.steps == 15


def test_pickle_in_place_of_checkpoint_is_refused(tmp_path):
    """A crafted pickle would run code when unpickled; the loader must never unpickle it."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(pickle.dumps(Exploit()))
    (folder / "config.json").write_text(json.dumps({"format": "diffusion-model-v1", "config": {}}))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(folder)
    ckpt = tmp_path / "last.safetensors"
    torch.save({"x": Exploit()}, ckpt, _use_new_zipfile_serialization=True)
    with pytest.raises(CheckpointError, match="never unpickled"):
        load_model(ckpt)
    assert not marker.exists()


def test_global_batches_cover_each_epoch_once():
    batches = GlobalBatches(100, 10, seed=3)
    epoch0 = torch.cat([batches.indices(s) for s in range(10)])
    assert sorted(epoch0.tolist()) == list(range(100))
    epoch1 = torch.cat([batches.indices(s) for s in range(10, 20)])
    assert sorted(epoch1.tolist()) == list(range(100)) and not torch.equal(epoch0, epoch1)
    assert torch.equal(GlobalBatches(100, 10, seed=3).indices(13), batches.indices(13))


def test_learning_rate_warmup():
    assert learning_rate(0, 1.0, 10) == pytest.approx(0.1)
    assert learning_rate(9, 1.0, 10) == 1.0 and learning_rate(500, 1.0, 10) == 1.0
    assert learning_rate(0, 1.0, 0) == 1.0


@pytest.mark.parametrize("label_dropout", [0.0, 1.0])
def test_label_dropout_is_honoured(smoke_overrides, tmp_path, label_dropout):
    """With p = 1 only the "no class" row of the class embedding ever gets a gradient; with p = 0 it never does."""
    config = load_config("smoke", {**smoke_overrides, "model.num_classes": 10, "train.label_dropout": label_dropout,
                                   "sample.guidance_sweep": [0.0],  # p = 0 gives a model that cannot be guided
                                   "train.steps": 4, "train.checkpoint_every": 4, "train.log_every": 4})
    torch.manual_seed(config.train.seed)
    initial = build_denoiser(config).net.class_embedding.weight.detach().clone()  # the run's initial weights
    train(config, tmp_path, progress=False)
    trained = load_training_checkpoint(tmp_path / "checkpoints" / "last.safetensors").model["class_embedding.weight"]
    changed = (trained - initial).abs().amax(dim=1) > 0  # per row: 10 classes, then "no class"
    assert changed.tolist() == ([False] * 10 + [True] if label_dropout == 1.0 else [True] * 10 + [False])


def test_written_files_have_normal_permissions(smoke_overrides, tmp_path):
    """What a run writes for others to read (model, config, checkpoint, metrics, plots) gets the usual
    0666/0777 less the umask, not a temporary file's private 0600/0700."""
    import os
    import stat

    from diffusion_core.launch import write_resolved_config

    previous = os.umask(0o022)
    try:
        config = load_config("smoke", {**smoke_overrides, "train.steps": 5})
        train(config, tmp_path / "run", progress=False)
        write_resolved_config(config, tmp_path / "run")
    finally:
        os.umask(previous)
    written = [p for p in (tmp_path / "run").rglob("*")]
    assert {p.name for p in written} >= {"model", "model.safetensors", "config.json", "last.safetensors",
                                          "metrics.jsonl", "loss_curve.png"}
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path


def test_extended_plan_never_jumps():
    """A resumed cosine run given more steps: the rate is unchanged up to the resume step, continuous there, and
    then half a cosine from the rate reached down to 0 at the new end (closed form)."""
    plan = LearningRatePlan(0, 100, 1.0, 10, "cosine")
    longer = plan.extended(40, 250)
    reached = 0.5 * (1 + math.cos(math.pi * 30 / 90))  # the old plan's rate at step 40
    assert longer.at(40) == pytest.approx(reached, rel=1e-12)
    for step in (41, 100, 145, 249):
        assert longer.at(step) == pytest.approx(reached * 0.5 * (1 + math.cos(math.pi * (step - 40) / 210)), rel=1e-12)
    assert longer.at(250) == pytest.approx(0.0, abs=1e-12)
    assert plan.extended(5, 250).at(5) == plan.at(5) == pytest.approx(0.6)  # still warming up: only the end moves
    assert plan.extended(5, 250).at(130) == pytest.approx(0.5 * (1 + math.cos(math.pi * 120 / 240)))
    assert plan.extended(40, 100) == plan
    with pytest.raises(ConfigError, match="decayed to 0 at step 100.*--continue-from"):
        plan.extended(100, 200)


def test_resume_with_more_steps_keeps_the_learning_rate_continuous(smoke_overrides, tmp_path):
    """Resume a cosine run from step 10 of 20 with train.steps 40: the first rate after the checkpoint is the one
    the run had reached, decayed on along the longer cosine (closed form), not the jump the old rule made."""
    base = {**smoke_overrides, "train.lr_decay": "cosine", "train.log_every": 1, "train.checkpoint_every": 10}
    with pytest.raises(Crash):  # killed after the step-10 checkpoint of a 20-step plan
        train(load_config("smoke", {**base, "train.steps": 20}), tmp_path, progress=False, on_metrics=_stop_after(11))
    rates = {}
    train(load_config("smoke", {**base, "train.steps": 40}), tmp_path, progress=False,
          on_metrics=lambda step, m: rates.__setitem__(step, m["lr"]))
    peak, warmup = 1e-3, 5
    reached = peak * 0.5 * (1 + math.cos(math.pi * (10 - warmup) / (20 - warmup)))
    assert sorted(rates) == list(range(11, 41))
    for done in (11, 25, 40):  # the report at `done` shows the rate of step done − 1
        assert rates[done] == pytest.approx(reached * 0.5 * (1 + math.cos(math.pi * (done - 1 - 10) / 30)), rel=1e-9)


def _stop_after(step):
    def callback(done, _metrics):
        if done >= step:
            raise Crash

    return callback


def test_continuing_equals_the_uninterrupted_run(smoke_overrides, tmp_path):
    """Continue a 12-step run (constant rate after warm-up) for 8 more steps with the constant schedule and the
    run's own EMA: the same weights, EMA and optimizer state as one 20-step run, since the whole state (RNG
    streams, data-order position, EMA count) is carried over. Exported model records where it started and what
    it saw."""
    base = {**smoke_overrides, "train.checkpoint_every": 4, "model.dropout": 0.1}
    straight, first, second = tmp_path / "straight", tmp_path / "first", tmp_path / "second"
    train(load_config("smoke", {**base, "train.steps": 20}), straight, progress=False)
    train(load_config("smoke", {**base, "train.steps": 12}), first, progress=False)
    continued = load_config("smoke", {**base, "train.steps": 8, "train.continue_schedule": "constant",
                                      "train.continue_ema_std": 0})
    result = train(continued, second, progress=False, continue_from=first / "checkpoints" / "last.safetensors")
    a = load_training_checkpoint(straight / "checkpoints" / "last.safetensors")
    b = load_training_checkpoint(second / "checkpoints" / "last.safetensors")
    assert result.step == a.step == b.step == 20 and b.start_step == 12
    for part in ("model", "ema"):
        assert all(torch.equal(getattr(a, part)[k], getattr(b, part)[k]) for k in a.model), part
    assert all(torch.equal(a.optimizer["state"][i]["exp_avg_sq"], b.optimizer["state"][i]["exp_avg_sq"])
               for i in a.optimizer["state"])
    info = json.loads((second / "model" / "config.json").read_text())
    assert (info["step"], info["start_step"], info["images_seen"]) == (20, 12, 20 * 16)


def test_restart_schedule_warms_up_again_from_the_continued_step(smoke_overrides, tmp_path):
    base = {**smoke_overrides, "train.log_every": 1}
    train(load_config("smoke", {**base, "train.steps": 10}), tmp_path / "first", progress=False)
    rates = {}
    config = load_config("smoke", {**base, "train.steps": 10, "train.lr_decay": "cosine",
                                   "train.continue_schedule": "restart"})
    train(config, tmp_path / "second", progress=False, continue_from=tmp_path / "first/checkpoints/last.safetensors",
          on_metrics=lambda step, m: rates.__setitem__(step, m["lr"]))
    assert sorted(rates) == list(range(11, 21))
    assert [rates[s] for s in (11, 15)] == pytest.approx([1e-3 / 5, 1e-3])  # warm-up over 5 steps from step 10
    assert rates[20] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 5)))


def test_a_continuation_switches_to_the_power_function_ema(smoke_overrides, tmp_path):
    """By default a fixed-decay run is continued under the power-function EMA (train.continue_ema_std = 0.1): it
    goes on from its EMA weights and update count n with the decay (1 − 1/n)^(γ+1) (EDM2 eq. 2), γ solving
    σ_rel² = (γ + 1)/((γ + 2)²(γ + 3)) (eq. 3) for σ_rel = 0.1, while the fresh run kept min(d, (1 + n)/(10 + n))."""
    base = {**smoke_overrides, "train.log_every": 1}
    fresh_decays, decays = {}, {}
    first = load_config("smoke", {**base, "train.steps": 10})
    train(first, tmp_path / "first", progress=False,
          on_metrics=lambda step, m: fresh_decays.__setitem__(step, m["ema_decay"]))
    assert (first.train.ema_std, first.train.continue_ema_std) == (0.0, 0.1)
    assert fresh_decays[10] == pytest.approx(min(first.train.ema_decay, 11 / 20), rel=1e-12)
    config = load_config("smoke", {**base, "train.steps": 3})
    train(config, tmp_path / "second", progress=False, continue_from=tmp_path / "first/checkpoints/last.safetensors",
          on_metrics=lambda step, m: decays.__setitem__(step, m["ema_decay"]))
    gamma = 6.9369  # σ_rel(6.9369) = 0.1000 to 4 digits:
    assert (gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)) == pytest.approx(0.1**2, rel=1e-4)
    # logged after update n = step: the decay the next update (n + 1) uses
    assert [decays[s] for s in (11, 13)] == pytest.approx([(1 - 1 / 12) ** (gamma + 1), (1 - 1 / 14) ** (gamma + 1)],
                                                          rel=1e-4)


def test_continuing_with_other_settings_or_data_is_refused_naming_both(smoke_run, smoke_overrides, data_dir, tmp_path):
    state = smoke_run / "checkpoints" / "last.safetensors"
    wider = load_config("smoke", {**smoke_overrides, "model.base_channels": 16})
    with pytest.raises(ContinuationMismatch, match=r"model.base_channels: 8 → 16"):
        train(wider, tmp_path / "a", progress=False, continue_from=state)
    other_dir = tmp_path / "data"
    other_sha = _other_dataset_version(data_dir, other_dir)
    trained_on = load_training_checkpoint(state).dataset_sha256
    on_new_data = load_config("smoke", {**smoke_overrides, "data.data_dir": str(other_dir), "train.steps": 2})
    with pytest.raises(ContinuationMismatch, match=f"{trained_on}.*{other_sha}"):
        train(on_new_data, tmp_path / "b", progress=False, continue_from=state)
    assert not (tmp_path / "b" / "checkpoints").exists()
    result = train(on_new_data, tmp_path / "c", progress=False, continue_from=state, allow_new_data=True)
    assert (result.step, result.dataset_sha256) == (22, other_sha)
