"""Load runs: locust in its own processes, every batch's outcome merged into a History, SLO gates.

Locust monkey-patches the standard library with gevent, so it never runs inside the harness's
process: ``LocustProcesses`` starts ``locust --headless`` (or a master and N workers, the same
command lines work across machines) on scenarios/load/locustfile.py, with the ingest URLs and the
token in its environment. Each locust worker writes an outcome file (see the locustfile);
``read_history`` reads them in bounded memory (harness.columnar: the operations without their
events, and the oracle), so the checker proves the aggregates exact after a load run like after
any scenario (``read_outcomes`` is the in-memory reader, for small runs and comparisons).
While the load runs, ``FreshnessMonitor`` sends one sentinel event at a time and polls
``qoe_window_aggregates`` until it is visible: the end-to-end freshness lag (event time ->
visible). ``run_load`` ties it together, optionally with
a fault in the middle (chaos under load), and ``evaluate`` gates the measurements on an
``Slo``; profiles: steady, step (raise the rate until an SLO breaks), soak and chaos.

Modules: ``spec`` (what to offer), ``settings`` (every QOE_LOAD_* setting and its default),
``outcomes`` (the outcome-line format), ``locust`` (the processes and their outcome files),
``freshness``, ``gates`` (measurements and SLOs), ``run`` (a run, a step), ``profile`` (the
``load`` command's run and report; its arguments are read in harness.cli).

The names below are imported when first used, not with the package: the locustfile imports
``harness.load.settings`` and ``harness.load.outcomes`` in every locust process, and must not
pay for the rest (Docker clients, DuckDB: half a second of imports) or run it under gevent.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.load.freshness import FreshnessMonitor, FreshnessSample
    from harness.load.gates import Breach, LoadStats, Slo, evaluate, load_slo, percentile, stats_of
    from harness.load.locust import (
        LOCUSTFILE,
        LocustProcesses,
        read_history,
        read_locust_history,
        read_outcomes,
    )
    from harness.load.profile import LoadPlan, run_profile
    from harness.load.run import (
        LOAD_HEALTH_INTERVAL_S,
        LoadResult,
        StepResult,
        run_load,
        run_step,
        stage_summary,
        step_rates,
    )
    from harness.load.spec import LoadSpec

_MODULE_OF = {
    "FreshnessMonitor": "harness.load.freshness",
    "FreshnessSample": "harness.load.freshness",
    "Breach": "harness.load.gates",
    "LoadStats": "harness.load.gates",
    "Slo": "harness.load.gates",
    "evaluate": "harness.load.gates",
    "load_slo": "harness.load.gates",
    "percentile": "harness.load.gates",
    "stats_of": "harness.load.gates",
    "LOCUSTFILE": "harness.load.locust",
    "LocustProcesses": "harness.load.locust",
    "read_history": "harness.load.locust",
    "read_locust_history": "harness.load.locust",
    "read_outcomes": "harness.load.locust",
    "LoadPlan": "harness.load.profile",
    "run_profile": "harness.load.profile",
    "LOAD_HEALTH_INTERVAL_S": "harness.load.run",
    "LoadResult": "harness.load.run",
    "StepResult": "harness.load.run",
    "run_load": "harness.load.run",
    "run_step": "harness.load.run",
    "stage_summary": "harness.load.run",
    "step_rates": "harness.load.run",
    "LoadSpec": "harness.load.spec",
}
__all__ = [
    "LOAD_HEALTH_INTERVAL_S",
    "LOCUSTFILE",
    "Breach",
    "FreshnessMonitor",
    "FreshnessSample",
    "LoadPlan",
    "LoadResult",
    "LoadSpec",
    "LoadStats",
    "LocustProcesses",
    "Slo",
    "StepResult",
    "evaluate",
    "load_slo",
    "percentile",
    "read_history",
    "read_locust_history",
    "read_outcomes",
    "run_load",
    "run_profile",
    "run_step",
    "stage_summary",
    "stats_of",
    "step_rates",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'harness.load' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
