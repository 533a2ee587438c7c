"""Serve the pipeline's deployments from this process (run it from the repository root):

    python -m flows.deploy

  train-eval/nightly   on the cron schedule $DIFFUSION_NIGHTLY_CRON (default "0 2 * * *", in
                       $DIFFUSION_NIGHTLY_TIMEZONE, default UTC) with the preset
                       $DIFFUSION_NIGHTLY_PRESET (default mnist-cpu-cond) under the policy
                       $DIFFUSION_NIGHTLY_POLICY (flows.nightly: continue, the default, continues the
                       training state of the champion's line; skip-unchanged; fresh); one run at a time (a
                       deployment concurrency limit of 1): a run triggered while one runs waits
                       for it ($DIFFUSION_NIGHTLY_ON_COLLISION=enqueue, the default) or is cancelled
                       (cancel_new)
  train-eval/adhoc     no schedule: `prefect deployment run 'train-eval/adhoc' --param preset=smoke`
  rescore/champion     no schedule: re-score a registered model's champion under the model's gate
                       (flows.rescore), e.g. `prefect deployment run 'rescore/champion'
                       --param model=ddpm-mnist-cond`
  sample-model/champion
                       no schedule: N images of a registered version (default its champion) in resumable
                       shards (flows.sample_model), e.g. `prefect deployment run 'sample-model/champion'
                       --param model=ddpm-mnist-cond --param num_samples=10000`; its shards run on the
                       Dask cluster at $DIFFUSION_DASK_ADDRESS when that is set
  distill-eval/champion
                       no schedule: distil a registered version (default its champion) into a few-step
                       student, registered as `<model>-<method><steps>` with the teacher as parent
                       (flows.distill_eval), e.g. `prefect deployment run 'distill-eval/champion'
                       --param model=ddpm-mnist-cond --param overrides='{"distill.method": "progressive"}'`
  train-distill/few-step
                       no schedule: train a preset and distil the version it registered in one run
                       (flows.train_distill), e.g. `prefect deployment run 'train-distill/few-step'
                       --param preset=mnist-cpu-cond-few-step`

Scheduled and triggered runs execute in subprocesses of this process, in its working folder, with
its environment (PREFECT_API_URL, MLFLOW_TRACKING_URI, S3 settings: see .env.example). To run them
on other machines instead, deploy to a work pool (see infra/README.md).

With $DIFFUSION_ALERT_WEBHOOK_URL set, the alerts of flows.alerts (a failed or crashed train-eval run;
no completed nightly run within $DIFFUSION_ALERT_NIGHTLY_WINDOW, default 26h) are installed on the
Prefect server first, or updated; unset, one line says that alerts are off.
"""

from __future__ import annotations

import os

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.schedules import Cron

from diffusion_core.config import DEFAULT_PRESET

from .alerts import NIGHTLY_DEPLOYMENT, WEBHOOK_URL_ENV, install_from_env
from .distill_eval import distill_eval
from .nightly import check_policy
from .rescore import rescore
from .sample_model import DASK_ADDRESS_ENV, sample_model_flow
from .train_distill import train_distill
from .train_eval import train_eval

COLLISION_ENV = "DIFFUSION_NIGHTLY_ON_COLLISION"


def nightly_collision_strategy() -> ConcurrencyLimitStrategy:
    """What happens to a nightly run triggered while another runs: $DIFFUSION_NIGHTLY_ON_COLLISION,
    `enqueue` (default: it waits) or `cancel_new` (it is cancelled)."""
    value = (os.environ.get(COLLISION_ENV) or "enqueue").strip().upper().replace("-", "_")
    if value not in ConcurrencyLimitStrategy.__members__:
        raise ValueError(f"{COLLISION_ENV}={os.environ[COLLISION_ENV]!r}: expected enqueue or cancel_new")
    return ConcurrencyLimitStrategy[value]


def set_up_alerts() -> None:
    """Install the alerts (flows.alerts) when their webhook is configured; otherwise say they are off."""
    installed = install_from_env()
    if installed is None:
        print(f"flows.deploy: alerts are off; set {WEBHOOK_URL_ENV} (see flows/alerts.py) to turn them on",
              flush=True)
    else:
        print(f"flows.deploy: alerts installed: {', '.join(installed.automations)}", flush=True)


def main() -> None:
    collision = nightly_collision_strategy()
    set_up_alerts()
    nightly = train_eval.to_deployment(
        name=NIGHTLY_DEPLOYMENT,
        schedule=Cron(os.environ.get("DIFFUSION_NIGHTLY_CRON") or "0 2 * * *",
                      timezone=os.environ.get("DIFFUSION_NIGHTLY_TIMEZONE") or "UTC"),
        parameters={"preset": os.environ.get("DIFFUSION_NIGHTLY_PRESET") or DEFAULT_PRESET,
                    "policy": check_policy(os.environ.get("DIFFUSION_NIGHTLY_POLICY") or "continue")},
        tags=["nightly"],
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=collision),
    )
    adhoc = train_eval.to_deployment(name="adhoc", tags=["adhoc"])
    rescore_champion = rescore.to_deployment(name="champion", tags=["rescore"])
    sample_champion = sample_model_flow(os.environ.get(DASK_ADDRESS_ENV)).to_deployment(
        name="champion", tags=["sample"])
    distill_champion = distill_eval.to_deployment(name="champion", tags=["distill"])
    train_then_distill = train_distill.to_deployment(name="few-step", tags=["distill"])
    serve(nightly, adhoc, rescore_champion, sample_champion, distill_champion, train_then_distill)


if __name__ == "__main__":
    main()
