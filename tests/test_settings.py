"""Settings: parsed by libraries, validated at start, one source."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from django.test import override_settings

from brokersite.settings import database_from_url
from dispatch import conf
from dispatch.conf import BadSetting
from dispatch.redis.connection import RedisTarget
from tests.procs import ROOT


@pytest.mark.parametrize("name, value, complaint", [
    ("MAX_RETRIES", "2.5", "valid integer"),
    ("STRATEGY", "fastest", "least_loaded"),
    ("HEARTBEAT_INTERVAL", "0", "greater than 0"),
    ("WORKER_PORT", "70000", "less than or equal to 65535"),
    ("HISTORY", "maybe", "valid boolean"),
])
def test_a_bad_setting_stops_the_start_naming_it(tmp_path, name: str, value: str,
                                                 complaint: str) -> None:
    env = {**os.environ, f"BROKER_{name}": value,
           "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "manage.py", "runbroker"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"BROKER_{name}='{value}'" in result.stderr and complaint in result.stderr
    assert "Traceback" not in result.stderr  # a message, not a crash
    assert time.monotonic() - started < 30


def test_settings_are_validated_as_one_model() -> None:
    with override_settings(BROKER={"TIMEOUT": "12.5", "HISTORY": "0", "RATE_LIMIT": "7"}):
        assert (conf.get("TIMEOUT"), conf.get("HISTORY"), conf.get("RATE_LIMIT")) == \
            (12.5, False, 7)
    with override_settings(BROKER={"MAX_RETRIES": "-1"}), pytest.raises(BadSetting):
        conf.get("MAX_RETRIES")
    assert conf.get("MAX_RETRIES") == 2  # back to the default with the test's settings


def test_runbroker_flags_are_validated_too() -> None:
    with override_settings(BROKER={}):
        with pytest.raises(BadSetting, match="BROKER_TIMEOUT"):
            conf.override(TIMEOUT=-3)
        conf.override(TIMEOUT=4)
        assert conf.get("TIMEOUT") == 4.0


def test_database_url_keeps_its_query_options() -> None:
    config = database_from_url("postgres://broker:s%40cret@db.example:6432/jobs"
                               "?sslmode=require&connect_timeout=5")
    assert config["ENGINE"] == "django.db.backends.postgresql"
    assert (config["USER"], config["PASSWORD"], config["HOST"], config["PORT"],
            config["NAME"]) == ("broker", "s@cret", "db.example", 6432, "jobs")
    assert config["OPTIONS"] == {"sslmode": "require", "connect_timeout": 5}
    sqlite = database_from_url("sqlite:////tmp/broker.sqlite3")
    assert sqlite["NAME"] == "/tmp/broker.sqlite3"
    assert "journal_mode=WAL" in sqlite["OPTIONS"]["init_command"]


def test_redis_by_url_or_by_sentinels() -> None:
    assert not RedisTarget.from_env({})
    by_url = RedisTarget.from_env({"REDIS_URL": "redis://:pw@cache:6379/2"})
    assert by_url and str(by_url) == "cache:6379/2"  # no password in logs
    assert by_url.layer_host(socket_timeout=30) == {"address": "redis://:pw@cache:6379/2",
                                                    "socket_timeout": 30}
    sentinels = RedisTarget.from_env({"REDIS_SENTINELS": "s1:26379, [::1]:26380",
                                      "REDIS_SENTINEL_MASTER": "jobs", "REDIS_DB": "3"})
    assert sentinels.sentinels == (("s1", 26379), ("::1", 26380))
    host = sentinels.layer_host()
    assert (host["master_name"], host["db"], "address" in host) == ("jobs", 3, False)
    for bad in ({"REDIS_SENTINELS": "nohost"}, {"REDIS_SENTINELS": "h:port"},
                {"REDIS_SENTINELS": "h:1", "REDIS_URL": "redis://x"}, {"REDIS_DB": "x"}):
        with pytest.raises(BadSetting):
            RedisTarget.from_env(bad)


def test_an_unknown_setting_is_named_once_however_often_settings_are_read(
        caplog: pytest.LogCaptureFixture) -> None:
    from dispatch import conf

    for _ in range(3):
        conf.load({"TIMEOUT": 5, "TIMOUT": 5})
    assert [r.getMessage() for r in caplog.records].count(
        "unknown broker setting(s) ignored: BROKER_TIMOUT") == 1
