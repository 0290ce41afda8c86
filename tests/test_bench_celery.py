"""The bench's Celery peer without running it: why it is n/a, how it is set up, the target.

Fast (no processes, no Redis traffic): the measured run is ``python -m bench --systems
baseline,daphne,celery --points 64:4:100,1:4:100``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from bench import report, systems
from bench.scenarios import Row, Scenario


def test_celery_not_installed_is_a_reason(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "celery" else real(name, *a))
    with pytest.raises(systems.Unavailable, match="celery is not installed"):
        systems.make_system("celery", tmp_path).start()


def test_celery_without_redis_is_a_reason(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    if importlib.util.find_spec("celery") is None:
        pytest.skip("celery is not installed (bench/requirements.txt)")
    monkeypatch.setattr(systems, "port_open", lambda port, host="": False)
    with pytest.raises(systems.Unavailable, match="no Redis server on 127.0.0.1:6379"):
        systems.make_system("celery", tmp_path).start()


def test_celery_columns_and_own_database(tmp_path: Path) -> None:
    celery = systems.make_system("celery", tmp_path, redis_db=15, celery_redis_db=13,
                                 celery_pool="prefork:4")
    assert celery.broker_pids() == []  # Redis is its broker: the redis column
    assert "-P prefork -c 4" in celery.description and "db 13" in celery.description
    args = celery.worker_args
    assert args[args.index("--celery-pool") + 1] == "prefork:4"
    prefix = args[args.index("--celery-prefix") + 1]
    assert prefix and celery.loadgen_args == ["--celery-prefix", prefix]
    assert systems.make_system("daphne", tmp_path).worker_args == []


def test_celery_app_settings() -> None:
    pytest.importorskip("celery")
    from bench.celery_app import TASK, make_app

    app = make_app("redis://127.0.0.1:6379/14", "pfx:", "q", pool_limit=64)
    conf = app.conf
    assert conf.task_acks_late and not conf.task_ignore_result
    assert conf.result_backend == "redis://127.0.0.1:6379/14"
    assert conf.broker_transport_options["global_keyprefix"] == "pfx:"
    assert conf.result_backend_transport_options["global_keyprefix"] == "pfx:"
    assert conf.broker_pool_limit == 64 and conf.task_default_queue == "q"
    assert app.tasks[TASK].run("abc") == "abc"


def _row(system: str, point: tuple[int, int, int], rps: float, p50: float) -> Row:
    return Row(Scenario(system, *point), rps=rps, p50_ms=p50)


def _celery_targets(rows: list[Row]) -> list[dict]:
    return [t for t in report.targets(rows, None) if "beats Celery" in t["target"]]


def test_target_durable_mode_beats_celery() -> None:
    ref, one = (64, 4, 100), (1, 4, 100)
    rows = [_row("daphne", ref, 4000, 12.0), _row("celery", ref, 400, 150.0),
            _row("daphne", one, 1100, 0.8), _row("celery", one, 1200, 3.0)]
    at64, at1 = _celery_targets(rows)
    assert "64 in flight" in at64["target"] and at64["met"] is True
    assert "4,000 vs 400 req/s" in at64["measured"]
    assert "1 in flight" in at1["target"] and at1["met"] is False  # slower, though lower p50

    missing = _celery_targets([rows[0], Row(Scenario("celery", *ref), status="n/a",
                                            reason="no Redis server on 127.0.0.1:6379")])
    assert [t["met"] for t in missing] == [None, None]
    assert "no Redis server" in missing[0]["note"]
