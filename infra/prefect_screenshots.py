"""Screenshots of the Prefect UI's artifact pages for docs/operations.md (docs/prefect-artifact-*.png),
taken with headless Chromium (the browser driver of infra/mlflow_screenshots.py).

    apt-get install chromium                          # any Chromium or Chrome; nothing is downloaded
    pip install -e '.[screenshots]'                   # websockets, for the DevTools protocol
    infra/stack.sh up && eval "$(infra/stack.sh env)"  # servers with at least one train-eval run (two: a comparison)
    python infra/prefect_screenshots.py --url "${PREFECT_API_URL%/api}"   # writes docs/prefect-artifact-*.png

What each picture shows (pages of the Prefect server at --url; nothing is written to it):

- `prefect-artifact-summary.png`: the newest artifact of the key `train-eval-<model>`
  (`/artifacts/artifact/<id>`): the run's primary FID ± σ at its N beside the champion's, the decision
  and its reason, the rule, links to the MLflow run, the model version and the sample grid, and the grid
  itself when MLflow is a server. (`/artifacts/key/train-eval-<model>` lists the key's history, one
  entry per run.)
- `prefect-artifact-table.png`: the newest artifact of the key `scores-<model>`: the run's scores of
  every sampler setting.

The pages are drawn in the UI's light colour scheme: the script puts that choice into the browser's
localStorage before the pages load, as if a user had chosen it. The UI calls the API address the server
was started with (`PREFECT_UI_API_URL`, default port 4200): a server on another port needs it set.
"""

from __future__ import annotations

import argparse
import json
import shutil
import urllib.request
from pathlib import Path

from mlflow_screenshots import DOCS, Browser


def latest_artifact(api: str, key: str) -> dict:
    """The newest artifact of `key` from the Prefect API at `api`, or SystemExit naming what to run first."""
    body = json.dumps({"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}).encode()
    request = urllib.request.Request(f"{api}/artifacts/filter", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        found = json.load(response)
    if not found:
        raise SystemExit(f"no Prefect artifact with key {key!r} at {api}: run train-eval against this server first")
    return found[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="Prefect server (its UI), e.g. http://127.0.0.1:4200")
    parser.add_argument("--model", default="ddpm-mnist", help="registered model whose artifacts are shown")
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for the PNG files (default: docs/)")
    parser.add_argument("--chromium", default=next(filter(None, map(shutil.which, (
        "chromium", "chromium-browser", "google-chrome"))), None), help="the browser (default: found on PATH)")
    parser.add_argument("--width", type=int, default=1800)
    args = parser.parse_args(argv)
    if not args.chromium:
        parser.error("no Chromium on PATH (apt-get install chromium): give --chromium")
    url = args.url.rstrip("/")
    summary, scores = (latest_artifact(f"{url}/api", f"{kind}-{args.model}") for kind in ("train-eval", "scores"))
    first_setting = json.loads(scores["data"])[0]["setting"]

    args.out.mkdir(parents=True, exist_ok=True)
    browser = Browser(args.chromium, args.width)
    try:
        browser.set_local_storage(url, {"color-scheme": json.dumps("light")})  # the UI's setting; it starts dark
        browser.shoot(f"{url}/artifacts/artifact/{summary['id']}", ("Decision:", "MLflow run", "champion before"),
                      args.out / "prefect-artifact-summary.png", height=1140, sidebar=None)
        browser.shoot(f"{url}/artifacts/artifact/{scores['id']}", ("images_per_s", first_setting),
                      args.out / "prefect-artifact-table.png", height=560, sidebar=None)
    finally:
        browser.close()


if __name__ == "__main__":
    main()
