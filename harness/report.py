"""The run report: summary.json (data) and summary.html (a view of it) per run folder.

Everything of a run lives under ``reports/out/<run-id>/``. RunReport collects scenario
results (with their verdicts as data) and the run timeline; ``write`` stores summary.json and
renders summary.html from reports/templates/summary.html.j2: a self-contained page (inline CSS
and an inline SVG timeline drawn with matplotlib; no scripts, no CDN). ``render`` re-renders
the page from summary.json alone, for ``python -m harness report``.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2

from harness.checker import convergence_stats
from harness.history import Timeline

__all__ = ["TEMPLATES", "RunReport", "ScenarioResult", "render", "render_html", "timeline_svg"]

TEMPLATES = Path(__file__).resolve().parent.parent / "reports" / "templates"
TEMPLATE_NAME = "summary.html.j2"
SCHEMA_VERSION = 1
TESTS_SUITE = "tests"  # unit and component tests: one line of counts on the page

# Row order of the timeline; unknown sources follow in alphabetical order.
_SOURCES = ("nemesis", "docker", "workload", "checker", "scenario")
_COLORS = {
    "nemesis": "#d62728",
    "docker": "#1f77b4",
    "workload": "#2ca02c",
    "checker": "#9467bd",
    "scenario": "#7f7f7f",
}
# One colour per fault name in a picture (reds and browns first: green is the recovery).
_FAULT_COLOURS = ("#d62728", "#ff7f0e", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f")


@dataclass(frozen=True)
class ScenarioResult:
    nodeid: str
    outcome: str  # passed | failed | skipped
    duration_s: float
    verdict: Mapping[str, Any] | None
    details: Mapping[str, Any] = field(default_factory=dict)
    logs: Mapping[str, str] = field(default_factory=dict)
    finished_at: float = 0.0


class RunReport:
    """Collects one run's results; thread-safe; ``write`` may be called more than once."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        run_id: str,
        seed: int | None,
        stack_info: Mapping[str, Any] | None = None,
        *,
        command: str | None = None,
        scenario_command: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_id = run_id
        self.seed = seed
        self.stack_info = dict(stack_info or {})
        self.command = command or ".venv/bin/pytest"
        # The run's command without its selection (paths, -m, -k): what one nodeid follows.
        self.scenario_command = scenario_command or self.command
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._scenarios: list[ScenarioResult] = []
        self._marks: list[dict[str, Any]] = []

    def add_scenario(
        self,
        nodeid: str,
        outcome: str,
        duration_s: float,
        verdict: Mapping[str, Any] | None,
        details: Mapping[str, Any] | None = None,
        logs: Mapping[str, str] | None = None,
    ) -> None:
        result = ScenarioResult(
            nodeid=nodeid,
            outcome=outcome,
            duration_s=float(duration_s),
            verdict=verdict,
            details=dict(details or {}),
            logs=dict(logs or {}),
            finished_at=time.time(),
        )
        with self._lock:
            self._scenarios.append(result)

    def add_timeline(self, timeline: Timeline) -> None:
        marks = [m.to_dict() for m in timeline.marks()]
        with self._lock:
            self._marks.extend(marks)

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            scenarios = list(self._scenarios)
            marks = sorted(self._marks, key=lambda m: m["at"])
        return summarise(
            run_id=self.run_id,
            seed=self.seed,
            stack_info=self.stack_info,
            command=self.command,
            scenario_command=self.scenario_command,
            started_at=self.started_at,
            scenarios=scenarios,
            marks=marks,
        )

    def write(self) -> Path:
        """Write summary.json and summary.html; return the path of the page."""
        summary = self.to_dict()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
        page = self.run_dir / "summary.html"
        _atomic_write(page, render_html(summary, self.run_dir))
        return page


def summarise(
    *,
    run_id: str,
    seed: int | None,
    stack_info: Mapping[str, Any],
    command: str,
    scenario_command: str,
    started_at: float,
    scenarios: Sequence[ScenarioResult],
    marks: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The summary.json document: plain data, enough to re-render the page."""
    totals: dict[str, int] = {"total": len(scenarios)}
    for s in scenarios:
        totals[s.outcome] = totals.get(s.outcome, 0) + 1
    times = [
        float(s.verdict["convergence_s"])
        for s in scenarios
        if s.verdict and s.verdict.get("convergence_s") is not None
    ]
    failed = [s.nodeid for s in scenarios if s.outcome == "failed"]
    seed_arg = f" --run-seed {seed}" if seed is not None else ""
    rows = []
    for s in scenarios:
        row = asdict(s)
        row["reproduce"] = f"{scenario_command} {shlex.quote(s.nodeid)}{seed_arg}"
        rows.append(row)
    return {
        "schema": SCHEMA_VERSION,
        "run_id": run_id,
        "seed": seed,
        "stack": dict(stack_info),
        "started_at": started_at,
        "written_at": time.time(),
        "totals": totals,
        "valid": not failed,
        "convergence": convergence_stats(times),
        "reproduce": {
            "run": f"{command}{seed_arg}",
            "failed": f"{scenario_command} {' '.join(shlex.quote(n) for n in failed)}{seed_arg}"
            if failed
            else None,
        },
        "scenarios": rows,
        "recovery": [_recovery_row(s) for s in scenarios if s.details.get("faults")],
        "timeline": [dict(m) for m in marks],
    }


def suite_of(nodeid: str) -> str:
    """The part of the run a result belongs to: "tests" for the harness's and the services' own
    unit and component tests, else the scenario's module ("partitions", "load/load", ...)."""
    path = nodeid.split("::", 1)[0]
    if path.startswith("tests/"):
        return TESTS_SUITE
    module = path.removeprefix("scenarios/").removesuffix(".py")
    head, _, name = module.rpartition("/")
    name = name.removeprefix("test_")
    return f"{head}/{name}" if head else name


def _recovery_row(s: ScenarioResult) -> dict[str, Any]:
    """A fault scenario in the recovery table: its faults, and how long the system took."""
    faults = list(s.details["faults"])
    return {
        "nodeid": s.nodeid,
        "outcome": s.outcome,
        "faults": [
            f"{f['name']} ({f['detail']})" if f.get("detail") else f["name"] for f in faults
        ],
        "effect_s": max(
            (f["effect_s"] for f in faults if f.get("effect_s") is not None), default=None
        ),
        "held_s": sum(f["duration_s"] for f in faults if f.get("duration_s") is not None),
        "ready_again_s": s.details.get("ready_again_s"),
        "recovery_s": s.details.get("recovery_s"),
        "convergence_s": s.details.get("convergence_s"),
    }


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# --- the timeline picture -------------------------------------------------------------------


def _label(text: str) -> str:
    # matplotlib treats $...$ as math; marks are plain text.
    return text.replace("$", r"\$")


def inline_svg(fig: Any) -> str:
    """A matplotlib figure as an <svg> element to inline in HTML (no prologue, no metadata)."""
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "qoe-harness"}):
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]
    return re.sub(r"\s*<metadata>.*?</metadata>", "", svg, flags=re.DOTALL)


def timeline_svg(marks: Sequence[Mapping[str, Any]], started_at: float | None = None) -> str:
    """The run timeline as an inline <svg>: a row per source, points for instants, bands for
    marks with a duration. Empty string when there is nothing to draw."""
    if not marks:
        return ""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in threads

    t0 = min([float(m["at"]) for m in marks] + ([started_at] if started_at else []))
    sources = sorted(
        {str(m["source"]) for m in marks},
        key=lambda s: (_SOURCES.index(s) if s in _SOURCES else len(_SOURCES), s),
    )
    row = {s: i for i, s in enumerate(sources)}
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "qoe-harness"}):
        fig = Figure(figsize=(11, 0.6 * len(sources) + 1.2), layout="constrained")
        ax = fig.add_subplot()
        for m in marks:
            src = str(m["source"])
            x = float(m["at"]) - t0
            y = row[src]
            color = _COLORS.get(src, "#555555")
            duration = m.get("duration_s")
            if duration:
                ax.broken_barh([(x, float(duration))], (y - 0.3, 0.6), color=color, alpha=0.35)
                ax.text(x, y + 0.32, _label(str(m["name"]))[:40], fontsize=7, va="bottom")
            else:
                ax.plot([x], [y], marker="|", markersize=14, color=color, linestyle="none")
        ax.set_yticks(range(len(sources)), [_label(s) for s in sources])
        ax.set_ylim(-0.7, len(sources) - 0.2)
        ax.set_xlabel("seconds since the run started")
        ax.grid(axis="x", alpha=0.3)
    return inline_svg(fig)


# --- the page -------------------------------------------------------------------------------


def _environment() -> jinja2.Environment:
    if not (TEMPLATES / TEMPLATE_NAME).is_file():
        raise FileNotFoundError(
            f"report template {TEMPLATES / TEMPLATE_NAME} not found; expected the repository's "
            "reports/templates next to the harness package (is the checkout complete?)"
        )
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["seconds"] = _seconds
    env.filters["num"] = _num
    env.filters["slug"] = lambda s: re.sub(r"[^A-Za-z0-9_-]+", "-", str(s)).strip("-")
    return env


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(x: float | None) -> str:
    return "-" if x is None else f"{float(x):.2f}s"


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


def _scenario_bands(scenarios: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each scenario as a band on the timeline, so faults line up with the test they hit."""
    bands = []
    for sc in scenarios:
        end, duration = sc.get("finished_at"), float(sc.get("duration_s") or 0.0)
        if not end or duration <= 0:
            continue
        name = str(sc["nodeid"]).rsplit("::", 1)[-1]
        mark = "" if sc.get("outcome") != "failed" else " (failed)"
        bands.append(
            {
                "at": float(end) - duration,
                "source": "scenario",
                "name": name + mark,
                "duration_s": duration,
            }
        )
    return bands


def _fault_bands_of(scenarios: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each scenario's faults (from its history) as nemesis bands on the run timeline."""
    return [
        {
            "at": f["started_at"],
            "source": "nemesis",
            "name": f["name"],
            "detail": f.get("detail", ""),
            "duration_s": f.get("duration_s"),
        }
        for sc in scenarios
        for f in (sc.get("details") or {}).get("faults") or []
    ]


def fault_svg(details: Mapping[str, Any]) -> str:
    """A fault scenario over time: events acknowledged per second, the share of batches not
    acknowledged, and the aggregators' consumer lag; each fault as a red band, the recovery
    (heal -> database matches the oracle) as a green one. Empty when nothing was sampled."""
    clients = details.get("clients_over_time") or []
    lag = details.get("consumer_lag") or []
    faults = details.get("faults") or []
    if not clients and not lag:
        return ""
    from matplotlib.figure import Figure

    starts = [c["t"] for c in clients] + [t for t, _ in lag] + [f["started_at"] for f in faults]
    t0 = min(starts)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    acked, errors, backlog = fig.subplots(3, 1, sharex=True)
    xs = [c["t"] - t0 for c in clients]
    acked.step(xs, [c["acked"] for c in clients], where="post", label="events acknowledged/s")
    errors.step(
        xs,
        [100.0 * c["errors"] / c["batches"] if c["batches"] else 0.0 for c in clients],
        where="post",
        color="#d62728",
        label="batches not acknowledged (%)",
    )
    backlog.plot(
        [t - t0 for t, n in lag if n is not None],
        [n for _, n in lag if n is not None],
        color="#9467bd",
        label="consumer lag (messages not yet acknowledged)",
    )
    unread = [t - t0 for t, n in lag if n is None]
    if unread:
        backlog.plot(unread, [0] * len(unread), "x", color="#555555", label="lag unreadable")
    for ax, unit in ((acked, "events/s"), (errors, "%"), (backlog, "messages")):
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        _fault_bands(ax, faults, details.get("recovery_s"), t0, named=ax is acked)
        _legend_beside(ax)
    backlog.set_xlabel("seconds into the scenario")
    return inline_svg(fig)


def _fault_bands(
    ax: Any, faults: Sequence[Mapping[str, Any]], recovery_s: float | None, t0: float, named: bool
) -> None:
    """Each fault as a band from injection to healed, one colour per fault name (named in the
    legend of the top axes); the recovery after the last heal (heal -> database matches the
    oracle) in green. Bands carry SVG ids (`fault-band-N`, `recovery-band`) so a test can
    find them."""
    colours: dict[str, str] = {}
    low, high = ax.get_xlim()
    min_width = (high - low) / 250
    for i, f in enumerate(faults):
        first = f["name"] not in colours
        colour = colours.setdefault(f["name"], _FAULT_COLOURS[len(colours) % len(_FAULT_COLOURS)])
        start = f["started_at"] - t0
        # A fault shorter than a pixel (a 0.1 s response cut-off in a 40 s picture) still shows.
        end = start + max(f.get("duration_s") or 0.0, min_width)
        label = f"fault: {f['name']}" if named and first else "_nolegend_"
        ax.axvspan(start, end, color=colour, alpha=0.18, label=label).set_gid(f"fault-band-{i}")
    heals = [f["healed_at"] for f in faults if f.get("healed_at") is not None]
    if heals and recovery_s is not None:
        healed = max(heals) - t0
        label = "recovery: heal to the database matching the oracle" if named else "_nolegend_"
        band = ax.axvspan(healed, healed + recovery_s, color="#2ca02c", alpha=0.12, label=label)
        band.set_gid("recovery-band")


def _legend_beside(ax: Any) -> None:
    """The legend right of the axes, so it never covers the data."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def render_html(summary: Mapping[str, Any], run_dir: Path | None = None) -> str:
    """The HTML page for a summary.json document (with the load charts found in run_dir)."""
    scenarios = summary.get("scenarios", [])
    svg = timeline_svg(
        [*summary.get("timeline", []), *_scenario_bands(scenarios), *_fault_bands_of(scenarios)],
        summary.get("started_at"),
    )
    template = _environment().get_template(TEMPLATE_NAME)
    loads = load_charts(run_dir) if run_dir is not None else []
    pictures = {
        sc["nodeid"]: picture for sc in scenarios if (picture := fault_svg(sc.get("details") or {}))
    }
    suites: dict[str, list[Mapping[str, Any]]] = {}
    for sc in scenarios:
        suites.setdefault(suite_of(sc["nodeid"]), []).append(sc)
    tests = suites.pop(TESTS_SUITE, [])
    return template.render(
        s=summary,
        timeline_svg=svg,
        t0=summary.get("started_at"),
        loads=loads,
        pictures=pictures,
        suites=dict(sorted(suites.items())),
        tests=_counts(tests),
        failures=[sc for sc in scenarios if sc["outcome"] == "failed"],
    )


def _counts(results: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Results by outcome, in the order a reader wants them (failed first)."""
    order = ("failed", "passed", "skipped")
    counts = {k: sum(1 for r in results if r["outcome"] == k) for k in order}
    return {k: n for k, n in counts.items() if n}


# --- load runs: locust's charts and the harness's freshness lag ------------------------------


def load_charts(run_dir: Path) -> list[dict[str, str]]:
    """One chart per load run (each load.json the harness wrote under run_dir)."""
    charts = []
    for path in sorted(Path(run_dir).glob("**/load.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            charts.append({"name": str(doc.get("name", path.parent.name)), "svg": load_svg(doc)})
        except (OSError, ValueError, KeyError) as error:
            charts.append({"name": str(path), "svg": f"<p>cannot draw {path}: {error}</p>"})
    return charts


def load_svg(doc: Mapping[str, Any]) -> str:
    """Locust's requests/s and failures/s, latency percentiles and users, and the harness's
    freshness lag, against seconds into the run; the fault window as a red band."""
    import matplotlib
    from matplotlib.figure import Figure

    hist = doc.get("locust_history") or []
    fresh = doc.get("freshness") or []
    starts = [h["t"] for h in hist] + [f["sent_at"] for f in fresh]
    t0 = min(starts) if starts else 0.0
    batch = float((doc.get("spec") or {}).get("batch_size") or 1)
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "qoe-harness"}):
        fig = Figure(figsize=(11, 6.5), layout="constrained")
        rate, lat, users, lag = fig.subplots(4, 1, sharex=True)
        xs = [h["t"] - t0 for h in hist]
        rate.plot(xs, [h["rps"] * batch for h in hist], label="events/s sent (locust)")
        rate.plot(xs, [h["fps"] * batch for h in hist], color="#d62728", label="events/s failed")
        for key, style in (("p50_ms", "-"), ("p95_ms", "--"), ("p99_ms", ":")):
            lat.plot(xs, [h[key] for h in hist], ls=style, label=key.replace("_ms", ""))
        users.plot(xs, [h["users"] for h in hist], color="#7f7f7f", label="users")
        lag.plot(
            [f["sent_at"] - t0 for f in fresh],
            [f["lag_s"] for f in fresh],
            marker=".",
            ls="none",
            color="#9467bd",
            label="freshness lag (event time to visible)",
        )
        for ax, unit in ((rate, "events/s"), (lat, "ms"), (users, "users"), (lag, "s")):
            ax.set_ylabel(unit)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper left")
            fault = doc.get("fault")
            if fault:
                ax.axvspan(fault["start"] - t0, fault["end"] - t0, color="#d62728", alpha=0.15)
        lag.set_xlabel(
            "seconds into the load"
            + (f" (fault: {doc['fault']['name']})" if doc.get("fault") else "")
        )
    return inline_svg(fig)


def render(run_dir: str | os.PathLike[str]) -> Path:
    """Re-render summary.html from a run folder's summary.json; return the page's path."""
    run_dir = Path(run_dir)
    source = run_dir / "summary.json"
    if not source.is_file():
        raise FileNotFoundError(
            f"{source} not found: expected a run folder written by the harness "
            "(reports/out/<run-id>/); pass the folder of a finished run"
        )
    summary = json.loads(source.read_text(encoding="utf-8"))
    page = run_dir / "summary.html"
    _atomic_write(page, render_html(summary, run_dir))
    return page
