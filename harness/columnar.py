"""A load run's history in columns: the outcome files read into DuckDB, the oracle built there.

A History keeps every event as a Python object: 1M events took 8.6 s and 770 MB to check, and
an hour of load is tens of millions. ``ColumnarHistory`` reads the locust workers' outcome
files (format: harness.load.outcomes) with DuckDB into a table of events, under a memory
limit past which DuckDB spills to a temporary folder, and applies ``checker.expectation``'s
rules there, in two parts that together give the same Expectation:

- an id sent once, in an ok operation, with an ordinary payload (UTC microsecond timestamp,
  finite values: nearly every event of a load run) is fixed in its window. DuckDB folds those
  events into each window's count, minima, maxima and sums; the sums exact, because every
  value of a field times one power of two is a whole number, summed as a 128-bit integer and
  rounded once to the nearest double, which is what math.fsum returns.
- every other id (resent, unknown, failed and sent again, conflicting payloads, other
  timestamp forms, odd values) has all its attempts rebuilt as Operations, in the history's
  order, and handed to ``checker.expectation``: a load run has few.

Every window's fixed events end up as one exact aggregate (``Expectation.aggregated``): that is
all ``check`` needs of them, the choice search included. Headers of the operations (no events,
only their count) serve the load statistics. The in-memory reader (harness.load.read_outcomes)
stays the reference: tests/unit/harness/test_columnar.py runs both on the same files.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb

from harness import checker
from harness.checker import EPOCH, Aggregate, Expectation, WindowKey, aggregate
from harness.history import Event, History, Operation, Outcome
from harness.load import outcomes
from harness.load.outcomes import MISSING_COMPLETION, Dropped

__all__ = [
    "DEFAULT_MEMORY_LIMIT",
    "ColumnarHistory",
    "OutcomeSource",
    "outcome_files",
    "outcome_rows",
]

DEFAULT_MEMORY_LIMIT = "1GB"  # DuckDB's share; Python's part is per window, not per event
_OUTCOMES = {o.value for o in Outcome}
# How the harness and the locustfile write a ts (Event.to_wire's default form): its instant
# is read by DuckDB and Python alike. Any other form is left to Event.from_wire.
_CANONICAL_TS = "____-__-__T__:__:__.______+00:00"
_VALUES = ("rtt_ms", "jitter_ms", "loss_pct", "throughput_kbps")
_EVENT = (
    "STRUCT(event_id VARCHAR, probe_id VARCHAR, target VARCHAR, ts VARCHAR, rtt_ms DOUBLE, "
    "jitter_ms DOUBLE, loss_pct DOUBLE, throughput_kbps DOUBLE)"
)
_LINE_COLUMNS = "{" + ", ".join(f"{k}: '{t}'" for k, t in outcomes.LINE_COLUMNS.items()) + "}"
_BATCH_COLUMNS = f"{{i: 'BIGINT', b: 'STRUCT(events {_EVENT}[])'}}"
_READ = "format = 'newline_delimited', ignore_errors = true, maximum_object_size = 67108864"
# Every finite double is a whole multiple of 2**-1074: exact sums are kept at that scale.
_ULP_EXPONENT = 1074
# Per field, the values summed in DuckDB span at most this many binary orders of magnitude, so
# value * 2**k stays below 2**94 and a sum of 2**32 of them fits a HUGEINT (below 2**127).
_SPAN_BITS = 40


# --- outcome files --------------------------------------------------------------------------


@dataclass(frozen=True)
class OutcomeSource:
    """A folder of outcome files and when its load ended (an invocation without a
    completion ends then; None: each file's modification time)."""

    folder: Path
    ended_at: float | None = None


def outcome_files(folder: Path) -> list[Path]:
    """The outcome files in a load run's folder, once every remote worker's arrived whole."""
    for marker in sorted(Path(folder).glob("outcomes-*.shipped.json")):
        shipped = json.loads(marker.read_text())
        if not shipped["complete"]:
            raise ValueError(
                f"{marker.name}: the worker on {shipped['origin']} stopped shipping its outcomes "
                "before the end of the run (it died or lost the master), so the history misses "
                "its last batches and the run cannot be checked; its own outcome file on that "
                "machine holds them"
            )
    return sorted(Path(folder).glob("outcomes-*.jsonl"))


def outcome_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Every JSON object of an outcome file, line by line.

    A truncated last line is skipped (the worker died while writing it; the locustfile flushes
    an invocation before sending, so no request was sent without its whole line); damage
    anywhere else is an error.
    """
    with Path(path).open(encoding="utf-8") as f:
        lineno, line = 0, f.readline()
        while line:
            following = f.readline()
            lineno += 1
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    if not following:
                        return  # the worker died while writing its last line
                    raise ValueError(
                        f"{path}:{lineno}: expected one JSON object per line ({exc.msg}); "
                        "the outcome file is damaged, so the run cannot be checked"
                    ) from exc
            line = following


def _last_line_is_damaged(path: Path) -> bool:
    """Whether the last line of a file does not parse (and so is skipped, see outcome_rows)."""
    with path.open("rb") as f:
        end = f.seek(0, 2)
        if end and (f.seek(end - 1), f.read(1))[1] == b"\n":
            end -= 1  # the last line's own newline
        start, block = end, 1 << 16
        while start > 0:
            start = max(0, start - block)
            f.seek(start)
            cut = f.read(end - start).rfind(b"\n")
            if cut >= 0:
                start += cut + 1
                break
        f.seek(start)
        last = f.read(end - start)
    if not last.strip():
        return False
    try:
        json.loads(last)
    except ValueError:
        return True
    return False


# --- exact sums -------------------------------------------------------------------------------


def _exact(x: float) -> int:
    """x * 2**1074, a whole number for every finite double."""
    num, den = x.as_integer_ratio()
    return num << (_ULP_EXPONENT + 1 - den.bit_length())


def _rounded(exact: int) -> float:
    """The double nearest to exact * 2**-1074, ties to even (as math.fsum rounds)."""
    return exact / (1 << _ULP_EXPONENT)


@dataclass(frozen=True)
class _Scale:
    """How one field's values are summed in DuckDB: value * 2**shift is a whole number for
    every value in [tiny, huge) or 0; other values leave their id to Python."""

    shift: int
    tiny: float
    huge: float

    @classmethod
    def of(cls, smallest: float | None, largest: float | None) -> _Scale:
        if not smallest or not largest:  # nothing but zeros
            return cls(0, 0.0, math.inf)
        high = min(math.frexp(largest)[1], 1000)  # |x| < 2**high
        low = max(math.frexp(smallest)[1], high - _SPAN_BITS, -900)  # 2**(low-1) <= |x|
        # A double in [2**(low-1), 2**low) is a whole multiple of 2**(low-53).
        return cls(53 - low, math.ldexp(1.0, low - 1), math.ldexp(1.0, high))


# --- the store --------------------------------------------------------------------------------


class ColumnarHistory:
    """The operations and events of some outcome folders (and of operations held in memory, such
    as the freshness sentinels) in a DuckDB database in a temporary folder.

    Build it with ``read``; ``close`` (or a ``with`` block) removes the folder.
    """

    def __init__(
        self,
        *,
        memory_limit: str = DEFAULT_MEMORY_LIMIT,
        threads: int | None = None,
        work_dir: Path | None = None,
    ) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="qoe-columnar-", dir=work_dir))
        # Removed by close(), or when the store is dropped unclosed, or at exit at the latest.
        self._remove_dir = weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)
        config: dict[str, Any] = {
            "memory_limit": memory_limit,
            "temp_directory": str(self._dir / "spill"),
            "preserve_insertion_order": False,
        }
        if threads:
            config["threads"] = threads
        try:
            self.db = duckdb.connect(":memory:", config=config)
            self.db.execute("SET enable_progress_bar = false")
            self.db.execute(_SCHEMA)
        except BaseException:
            self._remove_dir()
            raise
        self._files: list[Path] = []
        self._in_memory: dict[tuple[int, int], Operation] = {}
        self._ops_built = False
        self._scales: tuple[_Scale, ...] | None = None
        # Sends the users' schedules held when the load stopped but never made (load statistics).
        self.dropped: tuple[Dropped, ...] = ()

    @classmethod
    def read(
        cls,
        sources: Sequence[OutcomeSource],
        operations: Iterable[Operation] = (),
        **settings: Any,
    ) -> ColumnarHistory:
        """The history of these outcome folders and in-memory operations, merged in order of
        invocation as History.merge(read_outcomes(folder, ended_at)..., History(operations))
        would merge them."""
        store = cls(**settings)
        try:
            for source in sources:
                for path in outcome_files(source.folder):
                    ended = source.ended_at
                    store._add_file(path, path.stat().st_mtime if ended is None else ended)
            store._add_operations(list(operations))
            store._build_operations()
        except duckdb.Error as exc:
            store.close()
            raise RuntimeError(_engine_failed("read the outcome files", store._dir, exc)) from exc
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        try:
            self.db.close()
        finally:
            self._remove_dir()

    def __enter__(self) -> ColumnarHistory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading ------------------------------------------------------------------------

    def _add_file(self, path: Path, ended_at: float) -> None:
        if any(c in str(path) for c in "*?[]{}'"):
            raise ValueError(
                f"{path}: DuckDB reads a path as a pattern; move the run to a folder whose path "
                "has none of * ? [ ] { } '"
            )
        fid = len(self._files)
        self._files.append(path)
        self.db.execute("INSERT INTO files VALUES (?, ?, ?)", [fid, str(path), ended_at])
        where = str(path)
        self.db.execute(
            f"""INSERT INTO lines SELECT {fid}, {", ".join(outcomes.LINE_COLUMNS)}
            FROM read_json('{where}', columns = {_LINE_COLUMNS}, {_READ})"""
        )
        self.db.execute(
            f"""INSERT INTO ev
            SELECT {fid}, i, pos, hash(e.event_id), e.event_id, e.probe_id, e.target, us,
                CASE WHEN us IS NULL THEN e.ts END,
                e.rtt_ms, e.jitter_ms, e.loss_pct, e.throughput_kbps,
                NOT coalesce(us IS NOT NULL AND e.event_id IS NOT NULL
                    AND e.probe_id IS NOT NULL AND e.target IS NOT NULL
                    AND {" AND ".join(_ordinary(f"e.{v}") for v in _VALUES)}, false)
            FROM (
                SELECT i, e, pos, CASE WHEN e.ts LIKE '{_CANONICAL_TS}'
                    THEN epoch_us(TRY_CAST(substr(e.ts, 1, 26) AS TIMESTAMP)) END AS us
                FROM (
                    SELECT i, unnest(b.events) AS e, generate_subscripts(b.events, 1) AS pos
                    FROM read_json('{where}', columns = {_BATCH_COLUMNS}, {_READ})
                    WHERE i IS NOT NULL
                )
            )"""
        )
        self._check_lines_read(fid, path)

    def _check_lines_read(self, fid: int, path: Path) -> None:
        """DuckDB reads a line it cannot parse as a row of NULLs: allowed once, for a truncated
        last line; otherwise Python reads the file to name the damage (or the lines it
        ignores, objects of no kind harness.load.outcomes knows)."""
        (unread,) = self.db.execute(
            "SELECT count(*) FROM lines WHERE fid = ? AND i IS NULL AND c IS NULL AND m IS NULL",
            [fid],
        ).fetchone() or (0,)
        if unread <= _last_line_is_damaged(path):
            return
        ignored = sum(1 for row in outcome_rows(path) if outcomes.decode(row) is None)
        if unread > ignored + _last_line_is_damaged(path):
            raise ValueError(
                f"{path}: DuckDB could not read {unread - ignored} line(s) that Python reads; "
                "check this run with the in-memory checker (harness.load.read_outcomes)"
            )

    def _add_operations(self, ops: list[Operation]) -> None:
        """Operations held in memory join through an outcome file of their own, so one reader
        and one order serve every operation."""
        if not ops:
            return
        path = self._dir / "outcomes-in-memory.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for n, op in enumerate(ops, start=1):
                body = json.dumps({"events": [e.to_wire() for e in op.events]})
                intended = op.invoked_at if op.intended_at is None else op.intended_at
                f.write(
                    outcomes.invocation_line(
                        n, intended, op.invoked_at, op.endpoint, op.process, body
                    )
                )
                f.write(
                    outcomes.completion_line(
                        n, op.completed_at, op.outcome.value, op.status, op.error
                    )
                )
        fid = len(self._files)
        self._add_file(path, 0.0)
        self._in_memory = {(fid, n): op for n, op in enumerate(ops, start=1)}

    def _build_operations(self) -> None:
        problems = self.db.execute(
            """SELECT fid, kind, n, what FROM (
                SELECT fid, 'invocation' AS kind, i AS n, 'appears twice' AS what FROM lines
                    WHERE i IS NOT NULL GROUP BY fid, i HAVING count(*) > 1
                UNION ALL SELECT fid, 'completion', c, 'appears twice' FROM lines
                    WHERE c IS NOT NULL AND i IS NULL GROUP BY fid, c HAVING count(*) > 1
                UNION ALL SELECT fid, 'invocation', i, 'has no time "t"' FROM lines
                    WHERE i IS NOT NULL AND t IS NULL
                UNION ALL SELECT fid, 'invocation', i, 'has no intended time "d"' FROM lines
                    WHERE i IS NOT NULL AND d IS NULL
                UNION ALL SELECT fid, 'completion', c, 'has no time "t"' FROM lines
                    WHERE c IS NOT NULL AND i IS NULL AND t IS NULL
                UNION ALL SELECT fid, 'completion', c, 'has outcome ' || coalesce(o, 'null')
                    FROM lines WHERE c IS NOT NULL AND i IS NULL
                    AND coalesce(o NOT IN ('ok', 'fail', 'unknown'), true)
            ) ORDER BY fid, n, kind DESC, what LIMIT 1"""
        ).fetchall()
        for fid, kind, n, what in problems:
            raise ValueError(
                f"{self._files[fid]}: {kind} {n} {what}; the outcome file is damaged, so the "
                "run cannot be checked"
            )
        # Python's merge: files in order, each file's invocations in order, then a stable
        # sort by invocation time; an invocation's number stands for its line's position.
        self.db.execute(
            f"""CREATE TABLE ops AS
            SELECT row_number() OVER (ORDER BY inv.t, inv.fid, inv.i) AS op, inv.fid, inv.i,
                inv.d AS intended, inv.t AS invoked, coalesce(cmp.t, f.ended_at) AS completed,
                coalesce(cmp.o, 'unknown') AS outcome, cmp.s AS status,
                CASE WHEN cmp.c IS NULL THEN '{MISSING_COMPLETION}' ELSE coalesce(cmp.x, '') END
                    AS error,
                inv.p AS process, inv.u AS endpoint
            FROM (SELECT * FROM lines WHERE i IS NOT NULL) inv
            JOIN files f ON f.fid = inv.fid
            LEFT JOIN (SELECT * FROM lines WHERE c IS NOT NULL AND i IS NULL) cmp
                ON cmp.fid = inv.fid AND cmp.c = inv.i"""
        )
        rows = self.db.execute(
            "SELECT m, d, t, p FROM lines WHERE m IS NOT NULL AND i IS NULL AND c IS NULL "
            "ORDER BY d, fid"
        ).fetchall()
        self.dropped = tuple(Dropped(int(m), d, t, str(p)) for m, d, t, p in rows)
        self.db.execute("DROP TABLE lines")
        self._ops_built = True

    # --- what the history says ----------------------------------------------------------

    def headers(self) -> History:
        """Every operation without its events (``events_omitted`` says how many), in order;
        operations given in memory come back as they were."""
        rows = self.db.execute(
            """SELECT o.fid, o.i, o.process, o.endpoint, o.invoked, o.completed, o.outcome,
                o.status, o.error, coalesce(n.n, 0), o.intended
            FROM ops o LEFT JOIN (SELECT fid, i, count(*) AS n FROM ev GROUP BY fid, i) n
                ON n.fid = o.fid AND n.i = o.i
            ORDER BY o.op"""
        ).fetchall()
        ops = []
        for (
            fid,
            i,
            process,
            endpoint,
            invoked,
            completed,
            outcome,
            status,
            error,
            n,
            intended,
        ) in rows:
            kept = self._in_memory.get((fid, i))
            if kept is None:
                kept = Operation(
                    str(process),
                    str(endpoint),
                    invoked,
                    completed,
                    Outcome(outcome),
                    (),
                    None if status is None else int(status),
                    error,
                    events_omitted=n,
                    intended_at=intended,
                )
            ops.append(kept)
        return History(ops)

    def counts(self) -> dict[str, int]:
        """Operations and events held (every event of every batch, failed ones too)."""
        (ops,) = self.db.execute("SELECT count(*) FROM ops").fetchone() or (0,)
        (events,) = self.db.execute("SELECT count(*) FROM ev").fetchone() or (0,)
        return {"operations": ops, "events": events}

    def expectation(self, window_seconds: int = 60, *, realtime: bool = True) -> Expectation:
        """``checker.expectation`` of this history (same rules, same result; see the module
        docstring for how the work is split)."""
        if window_seconds <= 0:
            raise ValueError(
                f"window length must be a positive number of seconds, got {window_seconds}"
            )
        try:
            scales = self._sort_ids()
            operations = self._python_operations()
            sums, plain_events = self._plain_windows(window_seconds, scales)
        except duckdb.Error as exc:
            raise RuntimeError(_engine_failed("build the oracle", self._dir, exc)) from exc
        partial = checker.expectation(operations, window_seconds, realtime=realtime)
        aggregated = {
            key: sums[key].with_events(events) if key in sums else aggregate(events)
            for key, events in partial.definite.items()
        }
        for key, window in sums.items():
            if key not in aggregated:
                aggregated[key] = window.with_events(())
        return Expectation(
            window_seconds=window_seconds,
            definite={},
            choices=partial.choices,
            acked_events=plain_events + partial.acked_events,
            unknown_events=partial.unknown_events,
            conflicting_events=partial.conflicting_events,
            # Every event not failed is plain (a window's) or Python's (partial's).
            probe_ids=frozenset(k.probe_id for k in sums) | partial.probe_ids,
            aggregated=aggregated,
        )

    def last_ok_at(self) -> float | None:
        (at,) = self.db.execute(
            "SELECT max(completed) FROM ops WHERE outcome = 'ok'"
        ).fetchone() or (None,)
        return at

    # --- the two parts of the oracle ----------------------------------------------------

    def _sort_ids(self) -> tuple[_Scale, ...]:
        """Mark the ids Python must handle (table python_ids); return each field's scale."""
        if self._scales is not None:
            return self._scales
        ranges = (
            self.db.execute(
                "SELECT "
                + ", ".join(
                    f"min(abs({v})) FILTER (WHERE {v} <> 0), max(abs({v}))" for v in _VALUES
                )
                + " FROM ev WHERE NOT odd"
            ).fetchone()
            or (None,) * 8
        )
        scales = tuple(_Scale.of(ranges[2 * n], ranges[2 * n + 1]) for n in range(len(_VALUES)))
        outside = " OR ".join(
            f"(e.{v} <> 0 AND abs(e.{v}) < {_literal(s.tiny)}) OR abs(e.{v}) >= {_literal(s.huge)}"
            for v, s in zip(_VALUES, scales, strict=True)
        )
        self.db.execute(
            # Ids sent more than once (in any outcome), or with an odd payload; and every id of
            # a batch not plainly acknowledged. Failed attempts need no care: Python skips them.
            f"""CREATE TEMP TABLE python_ids AS
            SELECT h FROM ev e GROUP BY h HAVING count(*) > 1 OR bool_or(e.odd OR {outside})
            UNION
            SELECT e.h FROM ev e SEMI JOIN (
                SELECT fid, i FROM ops WHERE outcome <> 'ok' OR invoked > completed
            ) o ON o.fid = e.fid AND o.i = e.i"""
        )
        self._scales = scales
        return scales

    def _python_operations(self) -> list[Operation]:
        """Every non-failed attempt at the ids Python handles, as operations in history order
        holding just those events."""
        rows = self.db.execute(
            f"""SELECT o.op, e.pos, o.process, o.endpoint, o.invoked, o.completed, o.outcome,
                o.status, o.error, e.fid, e.i, e.event_id, e.probe_id, e.target, e.us, e.ts,
                {", ".join(f"e.{v}" for v in _VALUES)}
            FROM ev e SEMI JOIN python_ids p ON p.h = e.h
            JOIN ops o ON o.fid = e.fid AND o.i = e.i
            WHERE o.outcome <> 'fail'
            ORDER BY o.op, e.pos"""
        ).fetchall()
        ops: list[Operation] = []
        batch: list[Event] = []
        for n, row in enumerate(rows):
            op, _, process, endpoint, invoked, completed, outcome, status, error = row[:9]
            batch.append(self._event(row[9:]))
            if n + 1 == len(rows) or rows[n + 1][0] != op:
                ops.append(
                    Operation(
                        str(process),
                        str(endpoint),
                        invoked,
                        completed,
                        Outcome(outcome),
                        tuple(batch),
                        None if status is None else int(status),
                        error,
                    )
                )
                batch = []
        return ops

    def _event(self, row: Sequence[Any]) -> Event:
        fid, i, event_id, probe_id, target, us, ts, *values = row
        fields = dict(
            zip(("event_id", "probe_id", "target"), (event_id, probe_id, target), strict=True)
        )
        fields |= dict(zip(_VALUES, values, strict=True))
        missing = [name for name, value in fields.items() if value is None]
        if us is None and ts is None:
            missing.append("ts")
        if missing:
            raise ValueError(
                f"{self._files[fid]}: invocation {i} has an event without {', '.join(missing)} "
                "(or with a value of the wrong type); the outcome file is damaged, so the run "
                "cannot be checked"
            )
        if us is None:
            return Event.from_wire(fields | {"ts": ts})  # every other form, as Python reads it
        return Event(
            event_id,
            probe_id,
            target,
            EPOCH + timedelta(microseconds=us),
            *values,
        )

    def _plain_windows(
        self, window_seconds: int, scales: Sequence[_Scale]
    ) -> tuple[dict[WindowKey, _WindowSums], int]:
        width = window_seconds * 1_000_000
        sums = ", ".join(
            f"sum(CAST(e.{v} * {_literal(math.ldexp(1.0, s.shift))} AS HUGEINT))"
            for v, s in zip(_VALUES, scales, strict=True)
        )
        rows = self.db.execute(
            f"""SELECT e.probe_id, e.target, e.us - ((e.us % {width}) + {width}) % {width},
                count(*), min(e.rtt_ms), max(e.rtt_ms), max(e.jitter_ms), max(e.loss_pct),
                min(e.throughput_kbps), {sums}
            FROM ev e ANTI JOIN python_ids p ON p.h = e.h
            GROUP BY ALL"""
        ).fetchall()
        windows: dict[WindowKey, _WindowSums] = {}
        shared: dict[Any, Any] = {}
        total = 0
        for (
            probe,
            target,
            start,
            n,
            rtt_min,
            rtt_max,
            jitter_max,
            loss_max,
            tput_min,
            *exact,
        ) in rows:
            key = WindowKey(
                shared.setdefault(probe, probe),
                shared.setdefault(target, target),
                EPOCH + timedelta(microseconds=start),
                window_seconds,
            )
            rtt, jitter, loss, tput = (
                int(x) << (_ULP_EXPONENT - s.shift) for x, s in zip(exact, scales, strict=True)
            )
            windows[key] = _WindowSums(
                n, (rtt, jitter, loss, tput), (rtt_min, rtt_max, jitter_max, loss_max, tput_min)
            )
            total += n
        return windows, total


@dataclass(frozen=True)
class _WindowSums:
    """A window's fixed events as DuckDB folded them: count, exact sums (times 2**1074) and
    the extremes (rtt min and max, jitter max, loss max, throughput min)."""

    samples: int
    sums: tuple[int, int, int, int]
    extremes: tuple[float, float, float, float, float]

    def with_events(self, events: Sequence[Event]) -> Aggregate:
        """The exact aggregate of these sums together with more fixed events."""
        sums = list(self.sums)
        rtt_min, rtt_max, jitter_max, loss_max, tput_min = self.extremes
        for e in events:
            for n, x in enumerate((e.rtt_ms, e.jitter_ms, e.loss_pct, e.throughput_kbps)):
                sums[n] += _exact(x)
            rtt_min, rtt_max = min(rtt_min, e.rtt_ms), max(rtt_max, e.rtt_ms)
            jitter_max, loss_max = max(jitter_max, e.jitter_ms), max(loss_max, e.loss_pct)
            tput_min = min(tput_min, e.throughput_kbps)
        rtt, jitter, loss, tput = (_rounded(s) for s in sums)
        return Aggregate(
            samples=self.samples + len(events),
            rtt_sum=rtt,
            rtt_min=rtt_min,
            rtt_max=rtt_max,
            jitter_sum=jitter,
            jitter_max=jitter_max,
            loss_sum=loss,
            loss_max=loss_max,
            throughput_sum=tput,
            throughput_min=tput_min,
        )


def _engine_failed(what: str, folder: Path, exc: Exception) -> str:
    return (
        f"DuckDB could not {what}: {exc}. It works in {folder} (spilling there past its memory "
        "limit): check that folder's free space, or give ColumnarHistory a larger memory_limit "
        "or another work_dir"
    )


def _ordinary(column: str) -> str:
    """SQL: a value DuckDB can sum exactly (finite, and not the negative zero)."""
    return f"isfinite({column}) AND NOT ({column} = 0 AND signbit({column}))"


def _literal(x: float) -> str:
    return "'inf'::DOUBLE" if math.isinf(x) else f"{x!r}::DOUBLE"


_SCHEMA = """
CREATE TABLE files (fid INTEGER, path VARCHAR, ended_at DOUBLE);
CREATE TABLE lines (fid INTEGER, i BIGINT, c BIGINT, m BIGINT, d DOUBLE, t DOUBLE, u VARCHAR,
    p VARCHAR, o VARCHAR, s BIGINT, x VARCHAR);
CREATE TABLE ev (fid INTEGER, i BIGINT, pos INTEGER, h UBIGINT, event_id VARCHAR,
    probe_id VARCHAR, target VARCHAR, us BIGINT, ts VARCHAR, rtt_ms DOUBLE, jitter_ms DOUBLE,
    loss_pct DOUBLE, throughput_kbps DOUBLE, odd BOOLEAN);
"""
