"""The alerts' and the nightly deployment's settings (flows.alerts, flows.deploy): what is accepted, and
that bad values are refused before anything reaches a server, without repeating a webhook URL (it may
hold a token). The alerts themselves are received end to end in tests/test_e2e.py."""

from __future__ import annotations

from datetime import timedelta

import pytest
from prefect.client.schemas.objects import ConcurrencyLimitStrategy

from flows.alerts import WEBHOOK_URL_ENV, check_webhook_url, main, parse_window
from flows.deploy import COLLISION_ENV, nightly_collision_strategy


@pytest.mark.parametrize("text, expected", [("26h", timedelta(hours=26)), ("15s", timedelta(seconds=15)),
                                            ("90m", timedelta(minutes=90)), ("1.5d", timedelta(hours=36))])
def test_window_is_a_number_and_a_unit(text, expected):
    assert parse_window(text) == expected


@pytest.mark.parametrize("text, message", [("9s", "at least 10s"), ("26", "a number and a unit"),
                                           ("-5h", "a number and a unit"), ("2 weeks", "a number and a unit")])
def test_bad_window_is_refused_naming_the_setting(text, message):
    with pytest.raises(ValueError, match=message) as refused:
        parse_window(text)
    assert "DIFFUSION_ALERT_NIGHTLY_WINDOW" in str(refused.value)


@pytest.mark.parametrize("url", ["hooks.example.com/T0/secret-token", "ftp://example.com/secret-token",
                                 "https:///secret-token"])
def test_bad_webhook_url_is_refused_without_repeating_it(url):
    with pytest.raises(ValueError, match=WEBHOOK_URL_ENV) as refused:
        check_webhook_url(url)
    assert "secret-token" not in str(refused.value)


def test_install_without_a_url_says_what_to_set(monkeypatch):
    monkeypatch.delenv(WEBHOOK_URL_ENV, raising=False)
    with pytest.raises(SystemExit, match=f"set {WEBHOOK_URL_ENV}"):
        main(["install"])


@pytest.mark.parametrize("value, expected", [(None, ConcurrencyLimitStrategy.ENQUEUE),
                                             ("enqueue", ConcurrencyLimitStrategy.ENQUEUE),
                                             ("cancel_new", ConcurrencyLimitStrategy.CANCEL_NEW),
                                             ("CANCEL-NEW", ConcurrencyLimitStrategy.CANCEL_NEW)])
def test_nightly_collision_strategy(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(COLLISION_ENV, raising=False)
    else:
        monkeypatch.setenv(COLLISION_ENV, value)
    assert nightly_collision_strategy() == expected


def test_unknown_collision_strategy_is_refused(monkeypatch):
    monkeypatch.setenv(COLLISION_ENV, "skip")
    with pytest.raises(ValueError, match=f"{COLLISION_ENV}='skip': expected enqueue or cancel_new"):
        nightly_collision_strategy()
