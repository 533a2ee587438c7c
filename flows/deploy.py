"""Serve the pipeline's deployments from this process (run it from the repository root):

    python -m flows.deploy

  train-eval/nightly   on the cron schedule $DIFFUSION_NIGHTLY_CRON (default "0 2 * * *", in
                       $DIFFUSION_NIGHTLY_TIMEZONE, default UTC) with the preset
                       $DIFFUSION_NIGHTLY_PRESET (default mnist-cpu-cond)
  train-eval/adhoc     no schedule: `prefect deployment run 'train-eval/adhoc' --param preset=smoke`
  rescore/champion     no schedule: re-score a registered model's champion under the model's gate
                       (flows.rescore), e.g. `prefect deployment run 'rescore/champion'
                       --param model=ddpm-mnist-cond`
  sample-model/champion
                       no schedule: N images of a registered version (default its champion) in resumable
                       shards (flows.sample_model), e.g. `prefect deployment run 'sample-model/champion'
                       --param model=ddpm-mnist-cond --param num_samples=10000`; its shards run on the
                       Dask cluster at $DIFFUSION_DASK_ADDRESS when that is set

Scheduled and triggered runs execute in subprocesses of this process, in its working folder, with
its environment (PREFECT_API_URL, MLFLOW_TRACKING_URI, S3 settings: see .env.example). To run them
on other machines instead, deploy to a work pool (see infra/README.md).
"""

from __future__ import annotations

import os

from prefect import serve
from prefect.schedules import Cron

from diffusion_core.config import DEFAULT_PRESET

from .rescore import rescore
from .sample_model import DASK_ADDRESS_ENV, sample_model_flow
from .train_eval import train_eval


def main() -> None:
    nightly = train_eval.to_deployment(
        name="nightly",
        schedule=Cron(os.environ.get("DIFFUSION_NIGHTLY_CRON") or "0 2 * * *",
                      timezone=os.environ.get("DIFFUSION_NIGHTLY_TIMEZONE") or "UTC"),
        parameters={"preset": os.environ.get("DIFFUSION_NIGHTLY_PRESET") or DEFAULT_PRESET},
        tags=["nightly"],
    )
    adhoc = train_eval.to_deployment(name="adhoc", tags=["adhoc"])
    rescore_champion = rescore.to_deployment(name="champion", tags=["rescore"])
    sample_champion = sample_model_flow(os.environ.get(DASK_ADDRESS_ENV)).to_deployment(
        name="champion", tags=["sample"])
    serve(nightly, adhoc, rescore_champion, sample_champion)


if __name__ == "__main__":
    main()
