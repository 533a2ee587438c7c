"""Alerts of the train-eval pipeline: Prefect automations that post to a webhook.

    DIFFUSION_ALERT_WEBHOOK_URL=https://hooks.example.com/T0/B0/token python -m flows.alerts install
    python -m flows.alerts show
    python -m flows.alerts remove

Two automations on the Prefect server, both notifying through one webhook block (`diffusion-alerts`,
a Custom Webhook block: POST of the JSON {"text", "subject", "body"}):

  diffusion: train-eval failed    a train-eval flow run entered Failed, Crashed or TimedOut (any run:
                                  deployment or not); the message names the run, its state and message,
                                  and its deployment
  diffusion: nightly silent       no train-eval run of the `nightly` deployment completed within the
                                  window (DIFFUSION_ALERT_NIGHTLY_WINDOW, default 26h); the message names
                                  the deployment and since when it has been silent

`install` creates them, or updates them by name (an automation already as wanted is left alone, so its
window keeps running). The URL (with any token in it) is kept in the block's secret values, which the
Prefect API and UI show masked; nothing here prints it. `python -m flows.deploy` installs them at start
when DIFFUSION_ALERT_WEBHOOK_URL is set.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

from prefect.automations import AutomationCore, EventTrigger, Posture, SendNotification
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

WEBHOOK_URL_ENV = "DIFFUSION_ALERT_WEBHOOK_URL"
WINDOW_ENV = "DIFFUSION_ALERT_NIGHTLY_WINDOW"
DEFAULT_WINDOW = timedelta(hours=26)
MIN_WINDOW = timedelta(seconds=10)  # Prefect's floor for a trigger that waits for an absent event
BLOCK_NAME = "diffusion-alerts"
FLOW_NAME = "train-eval"
NIGHTLY_DEPLOYMENT = "nightly"  # the scheduled deployment that flows.deploy serves
FAILED_NAME = f"diffusion: {FLOW_NAME} failed"
SILENT_NAME = f"diffusion: {NIGHTLY_DEPLOYMENT} silent"
FAILED_STATES = ("Failed", "Crashed", "TimedOut")
DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}

# Jinja templates the server renders when an automation fires: `event` is the flow run's state event,
# `deployment` the deployment it names (none for a run started without one), `firing` the trigger's firing.
FAILED_SUBJECT = ("train-eval run {{ event.resource['prefect.resource.name'] }} "
                  "{{ event.resource['prefect.state-name'] }}")
FAILED_BODY = (
    "Flow run {{ event.resource['prefect.resource.name'] }} of train-eval entered state "
    "{{ event.resource['prefect.state-name'] }} at {{ event.occurred.isoformat() }} "
    "(deployment: {{ 'train-eval/' ~ deployment.name if deployment else 'none' }}; "
    "flow run id {{ event.resource.id.removeprefix('prefect.flow-run.') }}). "
    "Message: {{ event.resource['prefect.state-message'] or '-' }}")
SILENT_SUBJECT = f"No completed run of {FLOW_NAME}/{NIGHTLY_DEPLOYMENT}"
SILENT_BODY = (
    f"No run of deployment {FLOW_NAME}/{NIGHTLY_DEPLOYMENT} has completed since "
    "{{ (firing.triggered - firing.trigger.within).isoformat() }} "
    "(window {{ firing.trigger.within }}, checked at {{ firing.triggered.isoformat() }}).")


@dataclass(frozen=True)
class Installed:
    """What `install_alerts` left on the server: the webhook block's id and the automations' ids by name."""

    block_id: str
    automations: dict[str, str]


def parse_window(text: str) -> timedelta:
    """A duration such as `26h`, `90m`, `15s` or `1.5d`; at least 10 s (Prefect's floor)."""
    match = DURATION.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{WINDOW_ENV}={text!r}: expected a number and a unit s, m, h or d, e.g. 26h or 15s")
    window = timedelta(**{UNITS[match.group(2)]: float(match.group(1))})
    if window < MIN_WINDOW:
        raise ValueError(f"{WINDOW_ENV}={text!r}: at least 10s (Prefect evaluates absences no finer)")
    return window


def check_webhook_url(url: str) -> str:
    """`url` if it is an http(s) URL with a host; the error never repeats the URL (it may hold a token)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{WEBHOOK_URL_ENV} is not an http(s) URL with a host (value not shown: it may hold a token)")
    return url.strip()


def automations(block_id: str, window: timedelta) -> list[AutomationCore]:
    """The two automations, notifying through the block `block_id`; the silence window is `window`."""
    train_eval = {"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME}
    nightly = {"prefect.resource.role": "deployment", "prefect.resource.name": NIGHTLY_DEPLOYMENT}
    return [
        AutomationCore(
            name=FAILED_NAME, description="A train-eval flow run failed, crashed or timed out.",
            trigger=EventTrigger(expect={f"prefect.flow-run.{state}" for state in FAILED_STATES},
                                 match={"prefect.resource.id": "prefect.flow-run.*"}, match_related=train_eval,
                                 posture=Posture.Reactive, threshold=1, within=timedelta(0)),
            actions=[SendNotification(block_document_id=block_id, subject=FAILED_SUBJECT, body=FAILED_BODY)]),
        AutomationCore(
            name=SILENT_NAME, description=f"No {FLOW_NAME}/{NIGHTLY_DEPLOYMENT} run completed within {window}.",
            trigger=EventTrigger(expect={"prefect.flow-run.Completed"},
                                 match={"prefect.resource.id": "prefect.flow-run.*"},
                                 match_related=[train_eval, nightly],
                                 posture=Posture.Proactive, threshold=1, within=window),
            actions=[SendNotification(block_document_id=block_id, subject=SILENT_SUBJECT, body=SILENT_BODY)]),
    ]


def save_webhook_block(url: str) -> str:
    """Create or overwrite the webhook block `diffusion-alerts` posting to `url`; return its id. The URL is
    a secret value of the block, substituted only when a notification is sent."""
    block = CustomWebhookNotificationBlock(
        name=BLOCK_NAME, url="{{webhook_url}}", method="POST",
        json_data={"text": "{{subject}}: {{body}}", "subject": "{{subject}}", "body": "{{body}}"},
        secrets={"webhook_url": check_webhook_url(url)})
    return str(block.save(BLOCK_NAME, overwrite=True))


def install_alerts(url: str, window: timedelta = DEFAULT_WINDOW) -> Installed:
    """Create or update (by name) the webhook block and both automations on the Prefect API the
    environment names; an automation that is already as wanted is left untouched (its window keeps
    running). Idempotent."""
    if window < MIN_WINDOW:
        raise ValueError(f"the silence window {window} is under Prefect's floor of {MIN_WINDOW}")
    block_id = save_webhook_block(url)
    ids = {}
    with get_client(sync_client=True) as client:
        for wanted in automations(block_id, window):
            found = client.read_automations_by_name(wanted.name)
            for duplicate in found[1:]:
                client.delete_automation(duplicate.id)
            if not found:
                ids[wanted.name] = str(client.create_automation(wanted))
                continue
            current = found[0]
            if AutomationCore(**current.model_dump(exclude={"id"})) != wanted:
                client.update_automation(current.id, wanted)
            ids[wanted.name] = str(current.id)
    return Installed(block_id, ids)


def remove_alerts() -> list[str]:
    """Delete both automations and the webhook block; return the names of what was deleted."""
    removed = []
    with get_client(sync_client=True) as client:
        for name in (FAILED_NAME, SILENT_NAME):
            for automation in client.read_automations_by_name(name):
                client.delete_automation(automation.id)
                removed.append(name)
        try:
            block = client.read_block_document_by_name(BLOCK_NAME, CustomWebhookNotificationBlock.get_block_type_slug(),
                                                       include_secrets=False)
        except ObjectNotFound:
            return removed
        client.delete_block_document(block.id)
    return removed + [BLOCK_NAME]


def install_from_env() -> Installed | None:
    """`install_alerts` with $DIFFUSION_ALERT_WEBHOOK_URL and $DIFFUSION_ALERT_NIGHTLY_WINDOW (default 26h);
    None when the URL is unset. Bad settings raise before anything is written."""
    url = os.environ.get(WEBHOOK_URL_ENV, "").strip()
    if not url:
        return None
    window = parse_window(os.environ.get(WINDOW_ENV) or "26h")
    return install_alerts(url, window)


def describe() -> list[str]:
    """One line per installed automation: name, enabled, trigger, and the block it notifies."""
    lines = []
    with get_client(sync_client=True) as client:
        for name in (FAILED_NAME, SILENT_NAME):
            found = client.read_automations_by_name(name)
            if not found:
                lines.append(f"{name}: not installed")
            for automation in found:
                trigger = automation.trigger
                posture = getattr(getattr(trigger, "posture", None), "value", "?")
                blocks = {str(a.block_document_id) for a in automation.actions if isinstance(a, SendNotification)}
                lines.append(f"{name}: {'enabled' if automation.enabled else 'disabled'}; "
                             f"{posture} on {', '.join(sorted(getattr(trigger, 'expect', ())))} "
                             f"(window {getattr(trigger, 'within', '?')}); notifies block {', '.join(sorted(blocks))}; "
                             f"id {automation.id}")
    return lines


def main(argv: list[str] | None = None) -> None:
    """`python -m flows.alerts install|show|remove` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m flows.alerts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("install", "show", "remove"))
    args = parser.parse_args(argv)
    if args.command == "install":
        try:
            installed = install_from_env()
        except ValueError as error:
            sys.exit(f"flows.alerts: {error}")
        if installed is None:
            sys.exit(f"flows.alerts: set {WEBHOOK_URL_ENV} to the webhook's URL first")
        print(f"webhook block {BLOCK_NAME} ({installed.block_id})")
    elif args.command == "remove":
        print("removed: " + (", ".join(remove_alerts()) or "nothing"))
        return
    print("\n".join(describe()))


if __name__ == "__main__":
    main()
