"""PostgreSQL helpers: fresh connections (never pinned to a dead server), migrations under an
advisory lock, and a background health check feeding /readyz."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import errors as pg_errors

from qoe.service import Backoff, RateLimitedLog, sleep_or_stop

log = logging.getLogger("qoe.db")

# Any constant works as long as every service uses the same one.
MIGRATION_LOCK_KEY = 0x51_6F_45_00  # "QoE\0"
_MIGRATION_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


def sql_dir() -> Path:
    """QOE_SQL_DIR in the images (/app/sql); the repo's stack/sql when run from a checkout."""
    configured = os.environ.get("QOE_SQL_DIR", "").strip()
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2] / "sql"


@dataclass(frozen=True, order=True)
class Migration:
    version: int
    name: str
    path: Path


def list_migrations(folder: Path) -> list[Migration]:
    """migrations/NNN_name.sql in version order; a repeated number or a stray file is an error
    (a silently skipped migration is worse than a service that will not start)."""
    migrations_dir = folder / "migrations"
    found: list[Migration] = []
    for path in sorted(migrations_dir.iterdir()):
        if path.suffix != ".sql":
            continue
        match = _MIGRATION_NAME.match(path.name)
        if match is None:
            raise ValueError(f"migration file {path} must be named NNN_lower_snake.sql")
        found.append(Migration(int(match.group(1)), match.group(2), path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"two migrations share a number in {migrations_dir}: {versions}")
    return sorted(found)


IDLE_IN_TRANSACTION_MS = 5000


async def connect(url: str) -> psycopg.AsyncConnection:
    """A new autocommit connection with short timeouts and TCP keepalives.

    Autocommit, so every `async with conn.transaction()` is a real BEGIN/COMMIT (on a
    non-autocommit connection an earlier query would have opened an implicit transaction and
    turned it into a mere savepoint). Keepalives notice a vanished server (failover,
    partition) in seconds rather than minutes.
    """
    return await psycopg.AsyncConnection.connect(
        url,
        autocommit=True,
        connect_timeout=3,
        keepalives=1,
        keepalives_idle=5,
        keepalives_interval=2,
        keepalives_count=3,
        tcp_user_timeout=10_000,
        application_name=os.environ.get("QOE_SERVICE", "qoe"),
        # A frozen or partitioned client must not hold its row locks (and so every other
        # aggregator) hostage: the server ends a transaction left idle this long, well inside
        # the consumer's ack wait, and the batch is redelivered to a live replica.
        options=f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}",
    )


async def migrate(conn: psycopg.AsyncConnection, folder: Path | None = None) -> list[int]:
    """Apply each migration not yet recorded in schema_migrations, in order, once.

    Runs under a session advisory lock so services starting together apply each file once;
    each file and its bookkeeping row commit together. Returns the versions applied now.
    """
    migrations = list_migrations(folder or sql_dir())
    await conn.set_autocommit(True)
    await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur = await conn.execute("SELECT version FROM schema_migrations")
        done = {row[0] for row in await cur.fetchall()}
        applied: list[int] = []
        for migration in migrations:
            if migration.version in done:
                continue
            await _apply(conn, migration)
            applied.append(migration.version)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))


async def _apply(conn: psycopg.AsyncConnection, migration: Migration) -> None:
    script = migration.path.read_text(encoding="utf-8")
    async with conn.transaction():
        # No parameters: psycopg sends the file as one simple query, so it may hold many
        # statements.
        await conn.execute(script.encode())
        await conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
            (migration.version, migration.name),
        )
    log.info("applied migration", extra={"version": migration.version, "migration": migration.name})


async def migrate_forever(url: str, stop: asyncio.Event) -> bool:
    """migrate() on a fresh connection, retried with backoff until the database answers.

    Returns False only if `stop` was set first.
    """
    backoff = Backoff(base=0.2, cap=5.0)
    noisy = RateLimitedLog(log)
    while not stop.is_set():
        try:
            async with await connect(url) as conn:
                await migrate(conn)
            return True
        except (psycopg.Error, OSError) as exc:
            noisy.warning("migrate", "cannot migrate yet: %s", exc)
            await sleep_or_stop(stop, backoff.next_delay())
    return False


RETRY_NOW = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)
"""Transaction conflicts: retry at once on the same connection."""


class DbHealth:
    """Checks the database every few seconds on its own connection, for /readyz."""

    def __init__(self, url: str, every: float = 2.0) -> None:
        self.url, self.every = url, every
        self.problem: str | None = "not checked yet"

    async def run(self, stop: asyncio.Event) -> None:
        conn: psycopg.AsyncConnection | None = None
        while not stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = await connect(self.url)
                await asyncio.wait_for(conn.execute("SELECT 1"), timeout=self.every + 1)
                self.problem = None
            except Exception as exc:
                self.problem = f"{type(exc).__name__}: {exc}".strip()
                conn = await close_quietly(conn)
            await sleep_or_stop(stop, self.every)
        await close_quietly(conn)

    def report(self) -> dict[str, str]:
        return {} if self.problem is None else {"postgres": self.problem}


async def close_quietly(conn: psycopg.AsyncConnection | None) -> None:
    """Close if open. Returns None so callers can write `conn = await close_quietly(conn)`."""
    if conn is not None:
        try:
            await conn.close()
        except Exception:  # closing a broken connection may itself fail; nothing to do
            log.debug("error closing connection", exc_info=True)
