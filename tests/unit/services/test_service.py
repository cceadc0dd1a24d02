"""Shared plumbing: JSON logs, the health app, backoff and migrations discovery."""

from __future__ import annotations

import json
import logging
import random
import warnings
from pathlib import Path

import pytest
from qoe.db import list_migrations, sql_dir
from qoe.service import Backoff, JsonFormatter, make_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


def test_json_log_line_has_fields_and_extras() -> None:
    record = logging.LogRecord("qoe.x", logging.WARNING, __file__, 1, "hi %s", ("there",), None)
    record.batch = 12
    doc = json.loads(JsonFormatter("ingest").format(record))
    assert doc["msg"] == "hi there"
    assert doc["level"] == "WARNING"
    assert doc["service"] == "ingest"
    assert doc["batch"] == 12
    assert doc["ts"].endswith("+00:00")


def test_health_app_endpoints() -> None:
    problems: dict[str, str] = {}

    async def readiness() -> dict[str, str]:
        return problems

    client = TestClient(make_app(readiness))
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    problems["postgres"] = "connection refused"
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["unreachable"] == {"postgres": "connection refused"}
    assert "# HELP" in client.get("/metrics").text


def test_failing_readiness_check_is_not_ready() -> None:
    async def broken() -> dict[str, str]:
        raise RuntimeError("oops")

    response = TestClient(make_app(broken)).get("/readyz")
    assert response.status_code == 503
    assert "oops" in response.json()["unreachable"]["readiness"]


def test_backoff_is_capped_full_jitter() -> None:
    backoff = Backoff(base=0.1, cap=5.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(50)]
    assert all(0 <= d <= 5.0 for d in delays)
    assert max(delays[:3]) <= 0.4
    backoff.reset()
    assert backoff.next_delay() <= 0.1


def test_repo_migrations_are_found_in_order() -> None:
    migrations = list_migrations(sql_dir())
    assert migrations[0].version == 1
    assert migrations[0].name == "init"
    text = migrations[0].path.read_text()
    for name in ("processed_events", "window_aggregates", "qoe_window_aggregates", "qoe_diagnoses"):
        assert name in text


def test_migration_names_are_checked(tmp_path: Path) -> None:
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "002_b.sql").write_text("")
    (tmp_path / "migrations" / "001_a.sql").write_text("")
    (tmp_path / "migrations" / "README.md").write_text("")
    assert [m.version for m in list_migrations(tmp_path)] == [1, 2]
    (tmp_path / "migrations" / "3_bad.sql").write_text("")
    with pytest.raises(ValueError, match="NNN_lower_snake"):
        list_migrations(tmp_path)


def test_duplicate_migration_numbers_are_an_error(tmp_path: Path) -> None:
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "001_a.sql").write_text("")
    (tmp_path / "migrations" / "001_b.sql").write_text("")
    with pytest.raises(ValueError, match="share a number"):
        list_migrations(tmp_path)


def test_sql_dir_honours_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QOE_SQL_DIR", "/app/sql")
    assert sql_dir() == Path("/app/sql")
    monkeypatch.delenv("QOE_SQL_DIR")
    assert (sql_dir() / "migrations" / "001_init.sql").is_file()
