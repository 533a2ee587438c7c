"""rollback: make the previous champion the champion again.

    python -m flows.rollback --model ddpm-mnist-cond --reason "v7's digits are smudged"

Every promotion points `previous` at the champion it replaces (flows.registry.select_champion). A rollback
swaps the two aliases under the model's champion lock, so `previous` then names the version rolled back
from and running the command again undoes it; both versions get a `rollback.<n>` tag saying who, when,
why and which way. Nothing is deleted or re-scored: the next train-eval run compares against the restored
champion as usual, and a nightly `continue` run continues from it, never from the version rolled back
from or what descends from it (a withdrawn line; flows.registry.rolled_back_from).
"""

from __future__ import annotations

import argparse
import getpass
import json
from datetime import datetime, timezone

from mlflow import MlflowClient

from diffusion_core.config import ConfigError

from .registry import CHAMPION, PREVIOUS, ROLLBACK_TAG, champion_lock



def rollback(client: MlflowClient, name: str, reason: str, by: str | None = None) -> tuple[str, str]:
    """Point `champion` at the version `previous` names and `previous` at the champion before; tag both.
    Returns (new champion, version rolled back from). A ConfigError when there is nothing to roll back to."""
    if not reason.strip():
        raise ConfigError("say why (--reason): the rollback is recorded on both versions")
    with champion_lock(name):
        aliases = client.get_registered_model(name).aliases
        if CHAMPION not in aliases or PREVIOUS not in aliases:
            raise ConfigError(f"registered model {name!r} has no {CHAMPION!r} and {PREVIOUS!r} aliases to swap (it "
                              f"has: {', '.join(sorted(aliases)) or 'none'}); a previous champion exists after the "
                              "first promotion")
        current, restored = str(aliases[CHAMPION]), str(aliases[PREVIOUS])
        record = {"from": current, "to": restored, "by": by or getpass.getuser(), "reason": reason,
                  "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        for version in (current, restored):
            tags = client.get_model_version(name, version).tags
            entry = len([key for key in tags if key.startswith(ROLLBACK_TAG)]) + 1
            client.set_model_version_tag(name, version, f"{ROLLBACK_TAG}{entry:04d}", json.dumps(record))
        client.set_registered_model_alias(name, PREVIOUS, current)
        client.set_registered_model_alias(name, CHAMPION, restored)
    return restored, current


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.rollback", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registered model name, e.g. ddpm-mnist-cond")
    parser.add_argument("--reason", required=True, help="why: recorded on both versions")
    args = parser.parse_args(argv)
    restored, current = rollback(MlflowClient(), args.model, args.reason)
    print(f"{args.model}: champion is v{restored} again (was v{current}, now {PREVIOUS!r})")


if __name__ == "__main__":
    main()
