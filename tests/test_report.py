"""The Prefect artifacts of a train-eval run (flows/report.py): markdown summary and score table, built
from a known metrics dict and decision and compared with content written out by hand."""

from __future__ import annotations

import pytest

from diffusion_core import load_config
from flows.registry import Decision, PromotionRule, Score
from flows.report import RunLinks, artifact_key, score_rows, server_url, summary_markdown
from flows.sample import sampler_settings

PROTOCOL = {"extractor_id": "lenet-mnist-abc123", "num_samples": "200", "sampler": "ddim5-eta0-linear",
            "dataset_sha256": "f" * 64}
RULE = PromotionRule(2.0, 0.0)


def test_summary_of_a_kept_version_links_the_mlflow_ui_without_credentials():
    decision = Decision(False, "gain 0.5 within the margin 1.41", Score(20.04, PROTOCOL, 0.5012), "2",
                        Score(20.54, {**PROTOCOL, "num_samples": "1000"}, 0.4987), RULE)
    server = server_url("https://alice:s3cret@mlflow.example.com:8443/tracking/")
    links = RunLinks(server, "7", "abc", "ddpm-mnist-cond", "3", "s3://bucket/mlflow/7/abc/artifacts",
                     "samples/ddim5_w3.png")
    assert server == "https://mlflow.example.com:8443/tracking"
    assert summary_markdown(decision, links) == """\
## ddpm-mnist-cond v3: kept

v2 stays the champion; v3 is kept as a version.

| | FID | ± σ | N | sampler | extractor |
|:--|--:|--:|--:|:--|:--|
| this run: v3 | 20.04 | 0.5 | 200 | ddim5-eta0-linear | lenet-mnist-abc123 |
| champion before: v2 | 20.54 | 0.5 | 1000 | ddim5-eta0-linear | lenet-mnist-abc123 |

σ: the bootstrap standard error of the FID.

**Decision: kept.** gain 0.5 within the margin 1.41

Rule (the model's gate): promote if champion FID − candidate FID > max(2·σ_gap, 0); σ_gap: the gap's paired bootstrap standard error (unpaired √(σ_candidate² + σ_champion²) when either sample set is missing)

- MLflow run: [abc](https://mlflow.example.com:8443/tracking/#/experiments/7/runs/abc)
- Model version: [ddpm-mnist-cond v3](https://mlflow.example.com:8443/tracking/#/models/ddpm-mnist-cond/versions/3)
- Sample grid (samples/ddim5_w3.png): `s3://bucket/mlflow/7/abc/artifacts/samples/ddim5_w3.png`

![samples/ddim5_w3.png](https://mlflow.example.com:8443/tracking/get-artifact?path=samples%2Fddim5_w3.png&run_uuid=abc)
"""


def test_summary_of_the_first_version_with_a_local_store_names_ids_and_uris():
    decision = Decision(True, "no champion yet", Score(123.456, PROTOCOL, 2.345), None, None, RULE)
    links = RunLinks(server_url("sqlite:///tmp/mlflow.db"), "1", "r1", "ddpm-mnist", "1", "/tmp/artifacts/1/r1/artifacts/",
                     "samples/ddim5.png")
    text = summary_markdown(decision, links)
    assert text.startswith("## ddpm-mnist v1: promoted\n\nv1 is the champion now.\n")
    assert "| this run: v1 | 123.5 | 2.3 | 200 | ddim5-eta0-linear | lenet-mnist-abc123 |\n" in text
    assert "| champion before: none | – | – | – | – | – |\n" in text
    assert "**Decision: promoted.** no champion yet\n" in text
    assert text.endswith("- MLflow run: `r1`\n- Model version: `models:/ddpm-mnist/1`\n"
                         "- Sample grid (samples/ddim5.png): `/tmp/artifacts/1/r1/artifacts/samples/ddim5.png`\n")
    assert "http" not in text and "![" not in text  # no UI to link to, no URL the UI could show an image from


def test_score_table_has_one_row_per_sampler_setting_with_its_own_scores():
    config = load_config("smoke", {"diffusion.timesteps": 20, "sample.steps": 5, "sample.nfe_sweep": [2]})
    metrics = {"fid_lenet_ddim5": 123.456789, "fid_std_lenet_ddim5": 1.234567, "kid_lenet_ddim5": 0.0123456,
               "precision_lenet_ddim5": 0.5, "recall_lenet_ddim5": 0.25, "confident_fraction_lenet_ddim5": 0.98765,
               "class_entropy_lenet_ddim5": 2.2, "sampling_images_per_s_ddim5": 987.654,
               "fid_lenet_ddpm20": 99.99999, "kid_lenet_ddpm20": 0.1, "sampling_images_per_s_ddpm20": 12.0,
               "fid_lenet_ddim2": 300.0, "fid_lenet_dpmpp2m2": 250.04, "fid_lenet_dpmpp2msde2": 260.06,
               "fid_lenet_ddim5_class3": 1.0, "fid_inception_ddim5": 7.0, "fid": 123.456789}  # not rows of this table
    rows = score_rows(metrics, sampler_settings(config), "lenet", "ddim5")
    empty = {"precision": None, "recall": None, "confident_fraction": None, "class_entropy": None}
    assert rows == [
        {"setting": "ddim5", "primary": "yes", "protocol": "ddim5-eta0-linear", "N": 200, "fid": 123.5,
         "fid_std": 1.235, "kid": 0.01235, "precision": 0.5, "recall": 0.25, "confident_fraction": 0.9877,
         "class_entropy": 2.2, "images_per_s": 987.7},
        {"setting": "ddpm20", "primary": "no", "protocol": "ddpm20-linear", "N": 16, "fid": 100.0, "fid_std": None,
         "kid": 0.1, **empty, "images_per_s": 12.0},
        {"setting": "ddim2", "primary": "no", "protocol": "ddim2-eta0-linear", "N": 16, "fid": 300.0,
         "fid_std": None, "kid": None, **empty, "images_per_s": None},
        {"setting": "dpmpp2m2", "primary": "no", "protocol": "dpmpp2m2-log_snr", "N": 16, "fid": 250.0,
         "fid_std": None, "kid": None, **empty, "images_per_s": None},
        {"setting": "dpmpp2msde2", "primary": "no", "protocol": "dpmpp2msde2-log_snr", "N": 16, "fid": 260.1,
         "fid_std": None, "kid": None, **empty, "images_per_s": None}]


def test_artifact_keys_are_valid_prefect_keys_or_refused():
    assert artifact_key("train-eval", "ddpm-fashion-mnist-cond") == "train-eval-ddpm-fashion-mnist-cond"
    with pytest.raises(ValueError, match="lowercase letters, digits and dashes"):
        artifact_key("scores", "DDPM_mnist")
