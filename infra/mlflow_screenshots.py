"""Screenshots of the MLflow UI for docs/operations.md (docs/mlflow-*.png), taken with headless Chromium.

    apt-get install chromium                          # any Chromium or Chrome; nothing is downloaded
    pip install -e '.[screenshots]'                   # websockets, for the DevTools protocol
    infra/stack.sh up && eval "$(infra/stack.sh env)"  # a server with at least two train-eval runs
    python infra/mlflow_screenshots.py --url "$MLFLOW_TRACKING_URI"   # writes docs/mlflow-*.png

What each picture shows (pages of the server at --url; nothing is written to the server):

- `mlflow-runs-table.png`: the experiment's run table (`#/experiments/<id>/runs`), best FID first, with the
  columns train.steps, champion.decision and the headline metrics fid, fid_std, kid, precision, recall,
  confident, class_entropy (kid_std is logged too, left out here for width).
- `mlflow-compare.png`: the compare view (`#/compare-runs`) of the champion's run and the challenger's (or,
  when the newest version is the champion, the run before it): a parallel-coordinates plot of train.steps
  against the headline metrics, run details, and the parameters that differ.
- `mlflow-model-versions.png`: the registered model's page (`#/models/<name>`): versions with their aliases
  (`champion`, `challenger`) and tags (eval.fid, eval.fid_std, the protocol, champion.decision, …).
- `mlflow-run.png`: the champion's run page: source file and git commit, registered version, tags, metrics.
- `mlflow-lineage.png`: the champion version's page (`#/models/<name>/versions/<v>`): its description, the
  lineage a nightly continuation leaves in words (the version it continued, images seen, runs, training
  minutes, its training state; flows.nightly.lineage_summary) and the gate's decision that made it
  champion, above its tags. (MLflow 3's version page lists only the first five tags, `champion.*`: the
  description is what shows the lineage.)
- `mlflow-run-artifacts.png`: its artifacts, the sample grids listed and `fid_vs_nfe.png` shown (with
  `sample.nfe_sweep` set; else `loss_curve.png`) beside `loss_curve.png` and `forward_process.png`.

The run table's columns, the "Model training" navigation and the closed assistant panel are UI state that
MLflow keeps in the browser's localStorage: the script puts them there before the pages load, as if a
user had chosen them. On the compare view it picks the plot's axes by keyboard, as a user would.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from websockets.sync.client import connect

HEADLINE = ("fid", "fid_std", "kid", "kid_std", "precision", "recall", "confident", "class_entropy")
DOCS = Path(__file__).resolve().parent.parent / "docs"
SIDEBAR = '[aria-label="Toggle sidebar"]'
SAMPLES_ARTIFACT = "samples"  # the folder of sample grids (flows/sample.py)


def rest(url: str, path: str, body: dict | None = None, **params: str) -> dict:
    """MLflow's REST API: GET `path` with `params`, or POST `body`."""
    address = f"{url}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(address, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


class Browser:
    """One page of a headless Chromium, driven over the DevTools protocol."""

    def __init__(self, chromium: str, width: int):
        self.profile = tempfile.TemporaryDirectory()
        self.process = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             f"--window-size={width},1000", "--remote-debugging-port=0", f"--user-data-dir={self.profile.name}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = Path(self.profile.name) / "DevToolsActivePort", time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"{chromium} did not open its DevTools port")
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            page = next(target for target in json.load(response) if target["type"] == "page")
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.calls, self.width = 0, width

    def call(self, method: str, **params) -> dict:
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:  # events in between are not needed
            message = json.loads(self.socket.recv())
            if message.get("id") == self.calls:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def set_local_storage(self, origin: str, items: dict[str, str]) -> None:
        """Put `items` into the localStorage of `origin` (before its pages load)."""
        self.call("Page.navigate", url=f"{origin}/health")
        for key, value in items.items():
            self.evaluate(f"localStorage.setItem({json.dumps(key)}, {json.dumps(value)})")

    def shoot(self, url: str, texts: tuple[str, ...], path: Path, height: int,
              then: Callable[[Browser], None] | None = None, timeout_s: float = 120, settle_s: float = 3,
              sidebar: str | None = SIDEBAR) -> None:
        """Load `url` in a fresh document `height` px tall, wait until the page shows each of `texts` and its
        images have loaded, hide the navigation sidebar (click `sidebar`; None: leave the page as it is), do
        `then` (clicks, choices), and save the page as `path`. A page that does not show `texts` in time is
        saved as `<path>.failed.png` for a look, and raises."""
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=height, deviceScaleFactor=1,
                  mobile=False)
        self.call("Page.navigate", url="about:blank")
        self.call("Page.navigate", url=url)
        deadline, check = time.monotonic() + timeout_s, json.dumps(list(texts))
        while not self.evaluate(f"{check}.every(t => (document.body?.innerText ?? '').includes(t)) "
                                "&& [...document.images].every(image => image.complete)"):
            if time.monotonic() > deadline:
                self.save(path.with_suffix(".failed.png"))
                missing = [t for t in texts if not self.evaluate(f"document.body.innerText.includes({json.dumps(t)})")]
                raise TimeoutError(f"{url}: the page did not show {missing} in {timeout_s:.0f} s")
            time.sleep(0.5)
        if sidebar:
            self.click(sidebar)
        if then:
            then(self)
        time.sleep(settle_s)  # column widths, charts and fonts after the data arrived
        self.save(path)

    def click(self, selector: str, text: str | None = None) -> None:
        """Click the first element the CSS `selector` finds (with `text`: the first whose text is exactly that)."""
        found = f"[...document.querySelectorAll({json.dumps(selector)})]" + (
            f".filter(e => e.textContent.trim() === {json.dumps(text)})" if text else "")
        if not self.evaluate(f"(e => e ? (e.click(), true) : false)({found}[0])"):
            raise RuntimeError(f"nothing to click at {selector!r}" + (f" reading {text!r}" if text else ""))
        time.sleep(1)

    def key(self, key: str, code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)
        time.sleep(0.2)

    def pick(self, selector: str, options: tuple[str, ...]) -> None:
        """Choose `options` in the select box whose input `selector` finds, as by keyboard: type the name, go
        down the filtered list to the option with exactly that name, Enter."""
        active = ("[...document.querySelectorAll('[class*=select-item-option-active]')]"
                  ".find(option => option.offsetParent !== null)?.getAttribute('title')")  # the open list's
        for option in options:
            self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
            self.call("Input.insertText", text=option)
            time.sleep(0.5)
            for _ in range(50):
                if self.evaluate(active) == option:
                    break
                self.key("ArrowDown", 40)
            else:
                raise RuntimeError(f"no option {option!r} at {selector!r}")
            self.key("Enter", 13)
        self.key("Escape", 27)

    def save(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        print(f"wrote {path}")

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=30)
        self.profile.cleanup()


def ui_state(experiment_id: str) -> dict[str, str]:
    """localStorage as MLflow's UI keeps it: the "Model training" navigation, the assistant panel closed,
    and in the experiment's run table the columns train.steps, champion.decision and the headline metrics
    (kid_std left out for width), in that order and wide enough to read."""
    metrics = [f"metrics.`{key}`" for key in HEADLINE if key != "kid_std"]
    columns = ["params.`train.steps`", "tags.`champion.decision`", *metrics]
    widths = {"attributes.`Run Name`": 210, "runDateAndNestInfo": 135, columns[0]: 95, columns[1]: 135,
              **{column: 110 for column in metrics}, "duration": 80}
    order = ["attributes.`Run Name`", "runDateAndNestInfo", *columns, "duration"]
    table = {"selectedColumns": columns, "columnOrder": order, "columnWidths": widths}
    return {"mlflow.workflowType_v1": json.dumps("machine_learning"), "mlflow.assistant.panelOpen_v1": "false",
            "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
            f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState': json.dumps(table)}


def plot_headline(browser: Browser) -> None:
    """On the compare view: the parallel-coordinates plot of train.steps against the headline metrics, and
    only the parameters that differ."""
    browser.click('[data-testid="clear-button"]')
    browser.pick("#dubois-select-1", ("train.steps",))
    browser.pick("#dubois-select-2", tuple(key for key in HEADLINE if key != "kid_std"))
    browser.click('[aria-label="Parameters - Show diff only"]')


def open_in_tree(browser: Browser, names: tuple[str, ...]) -> None:
    """On a run's artifacts: click each of `names` in the file tree (a folder opens, a file is shown)."""
    for name in names:
        browser.click("[role=treeitem] *, li *", name)


PAGES = ("runs-table", "compare", "model-versions", "run", "run-artifacts", "lineage")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="MLflow server, e.g. http://127.0.0.1:5000")
    parser.add_argument("--experiment", default="diffusion-mnist")
    parser.add_argument("--model", default="ddpm-mnist")
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for the PNG files (default: docs/)")
    parser.add_argument("--chromium", default=next(filter(None, map(shutil.which, (
        "chromium", "chromium-browser", "google-chrome"))), None), help="the browser (default: found on PATH)")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--pages", default=",".join(PAGES), help=f"which pictures (default all: {', '.join(PAGES)})")
    args = parser.parse_args(argv)
    pages = set(args.pages.split(","))
    if pages - set(PAGES):
        parser.error(f"unknown pages {', '.join(sorted(pages - set(PAGES)))}; choose from {', '.join(PAGES)}")
    if not args.chromium:
        parser.error("no Chromium on PATH (apt-get install chromium): give --chromium")
    url = args.url.rstrip("/")
    experiment = rest(url, "experiments/get-by-name", experiment_name=args.experiment)["experiment"]["experiment_id"]
    aliases = {a["alias"]: a["version"] for a in rest(url, "registered-models/get", name=args.model)
               ["registered_model"].get("aliases", [])}
    if "champion" not in aliases:
        raise SystemExit(f"{args.model} has no champion yet: run the pipeline first")
    runs = {alias: rest(url, "model-versions/get", name=args.model, version=version)["model_version"]["run_id"]
            for alias, version in aliases.items()}
    champion, challenger = runs["champion"], runs.get("challenger", runs["champion"])
    if challenger == champion:  # the newest version is the champion: compare with the run before it
        found = rest(url, "runs/search", {"experiment_ids": [experiment], "max_results": 2,
                                          "filter": "attributes.status = 'FINISHED'", "order_by": ["start_time DESC"]})
        challenger = next((r["info"]["run_id"] for r in found["runs"] if r["info"]["run_id"] != champion), champion)
    artifacts = {f["path"] for f in rest(url, "artifacts/list", run_id=champion).get("files", [])}
    picture = "fid_vs_nfe.png" if "fid_vs_nfe.png" in artifacts else "loss_curve.png"
    page = f"{url}/#/experiments/{experiment}"
    sort = urllib.parse.urlencode({"orderByKey": "metrics.`fid`", "orderByAsc": "true"})
    compare = urllib.parse.urlencode({"runs": json.dumps([champion, challenger]),
                                      "experiments": json.dumps([experiment])})

    args.out.mkdir(parents=True, exist_ok=True)
    browser = Browser(args.chromium, args.width)
    try:
        browser.set_local_storage(url, ui_state(experiment))
        shots = {
            "runs-table": lambda: browser.shoot(f"{page}/runs?{sort}", ("fid_std", "class_entropy", "promoted"),
                                                args.out / "mlflow-runs-table.png", height=420),
            "compare": lambda: browser.shoot(f"{url}/#/compare-runs?{compare}", ("Run details", "train.steps"),
                                             args.out / "mlflow-compare.png", height=1170, then=plot_headline),
            "model-versions": lambda: browser.shoot(f"{url}/#/models/{urllib.parse.quote(args.model)}",
                                                    ("champion", "challenger", "eval.fid_std"),
                                                    args.out / "mlflow-model-versions.png", height=1330),
            "run": lambda: browser.shoot(f"{page}/runs/{champion}", ("train_eval.py", args.model),
                                         args.out / "mlflow-run.png", height=1000),
            "run-artifacts": lambda: browser.shoot(f"{page}/runs/{champion}/artifacts/{picture}",
                                                   ("loss_curve.png", "forward_process.png"),
                                                   args.out / "mlflow-run-artifacts.png", height=760,
                                                   then=lambda b: open_in_tree(b, (SAMPLES_ARTIFACT, picture))),
            "lineage": lambda: browser.shoot(
                f"{url}/#/models/{urllib.parse.quote(args.model)}/versions/{aliases['champion']}",
                ("Lineage:", "Gate:"), args.out / "mlflow-lineage.png", height=1000),
        }
        for name in PAGES:
            if name in pages:
                shots[name]()
    finally:
        browser.close()


if __name__ == "__main__":
    main()
