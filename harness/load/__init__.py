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

Modules: ``spec`` (what to offer), ``locust`` (the processes and their outcome files),
``freshness``, ``gates`` (measurements and SLOs), ``run`` (a run, a step), ``profile`` (the
``load`` command's run and report; its arguments are read in harness.cli).
"""

from __future__ import annotations

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
