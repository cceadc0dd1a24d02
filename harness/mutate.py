"""Mutation testing of the reference services, with the scenarios as the test: `python -m harness
mutate`.

Why this shape:
- **cosmic-ray generates the mutants, this module runs them.** Its operators (binary, comparison
  and unary operators, booleans, numbers, break/continue, zero-iteration loops, ...) and its
  `mutate_code` make each mutant; its `exec` would run a test command in the mutated tree, but
  a mutant here is tested by building it into a service image and running scenarios against a
  stack, so which images to rebuild, when a stack must be fresh and which scenario killed it
  are this module's. mutmut 3 was not usable: it runs the tests in its own process through a
  trampoline in the mutated module, and these modules run inside containers.
- **Never in the checkout.** The services' sources are taken from the commit (`git archive
  HEAD`) into a temporary folder, mutated there one mutant at a time, and built into images
  tagged `mutate-<run>-...`; the stack's `dev` images, which every other run uses, are never
  touched. A compose override file (`StackOptions.compose_overrides`) points the mutation
  run's own stack at those images.
- **Only what the mutant touches is rebuilt and replaced.** The four service images share one
  Dockerfile; a mutant of `aggregator.py` is built into the aggregator image only, one of
  `contract.py` into every service that imports it (the import graph, read from the sources),
  and `ComposeStack.apply` recreates only the containers whose image changed.
- **One stack for many mutants, and no kill it did not earn.** Every scenario of the selection
  checks only its own events (ids and probes prefixed per run) except the ledger scenario,
  which checks the stack's own probes' whole ledgers; a killed mutant may have left wrong
  windows of those probes. So the stack is kept from mutant to mutant, and a mutant that fails
  only the ledger scenario on a stack a killed mutant ran on since it last passed is tested
  again on a fresh stack. A mutant whose scenarios time out leaves a fresh stack too.
- **The test command** is a fast selection of scenarios (`SELECTION`: e2e with its timestamp,
  threshold and bound cases, dedup without faults, bad input at the bounds), run by pytest in
  its own process against the stack as `--stack external`, with `-x`: the first failure kills
  the mutant, and the junit report names the scenario. It must pass on the unmutated services
  first (the baseline), else every mutant would look killed.
- **Which mutants.** Every position cosmic-ray's core operators find in the data path's
  modules (`MODULES`), except those that cannot change what the pipeline stores or answers:
  `|` in annotations (type unions), logging and metrics statements, and code that runs only
  with a seeded bug on (`if <flag>:` bodies, the other operands of `<flag> and ...`; the run
  switches no bug on, so those mutants are equivalent by construction). SQL is not mutated:
  cosmic-ray mutates Python syntax only, and the aggregator's and the migrations' SQL are
  strings to it. `--sample N --seed S` draws N of them; `--budget-minutes` stops starting new
  ones (those left are reported as not run). `--only ID` runs the mutants named instead (the
  ids of a report, e.g. to show that a new scenario check kills a survivor): an id is an
  operator's occurrence in a module's source, so it names the same mutant only while that
  module is as it was (the report records the commit).

Outcomes: killed (a scenario failed, or the mutated services did not come up healthy),
survived (the selection passed), timeout (the selection ran past its limit, counted as killed
in the score), incompetent (the mutant is not valid Python, or the harness failed around it:
not counted). The run folder gets `mutation.json` and `mutation.md` (every mutant with its
diff and its killer).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import io
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import docker
import parso.python.tree
import parso.tree
from cosmic_ray import plugins
from cosmic_ray.ast import ast_nodes, get_ast
from cosmic_ray.mutating import mutate_code

from harness.stack import (
    ROOT,
    ComposeStack,
    StackError,
    StackOptions,
    build_images,
    new_run_id,
)

SERVICES_DIR = "stack/services/qoe"
SQL_DIR = "stack/sql"
# The data path: what turns a probe's sample into a stored window and a diagnosis.
MODULES = ("contract", "windows", "aggregator", "diagnoser", "ingest", "probe")
SERVICES = ("ingest", "aggregator", "diagnoser", "probe")  # a module each, run as qoe.<name>
COMPOSE_SERVICES = {
    "ingest": ("ingest-1", "ingest-2"),
    "aggregator": ("aggregator-1", "aggregator-2"),
    "diagnoser": ("diagnoser",),
    "probe": ("probe-1", "probe-2"),
}
SELECTION = (
    "scenarios/test_e2e.py",
    "scenarios/test_dedup.py",
    "scenarios/test_bad_input.py",
    "-m",
    "not partition and not restart",
)
# The one scenario that reads what earlier mutants left: the stack's probes' whole ledgers.
LEDGER_SCENARIO = "scenarios.test_e2e::test_probes_ledgers_match_aggregates"
OUTCOMES = ("killed", "timeout", "survived", "incompetent", "not run")
# Statements that only report: a mutant there changes a log line or a metric, not the data.
_REPORTING = re.compile(
    r"^\s*(log|noisy|logging)\.|^\s*[A-Z_]+(\.labels\(.*\))?\.(inc|dec|observe|set)\("
    r"|^\s*[A-Z_]+\s*=\s*(Counter|Gauge|Histogram)\("
)


@dataclass(frozen=True)
class Mutant:
    """One of cosmic-ray's mutations: `operator`'s `occurrence`-th position in `module`."""

    module: str
    operator: str  # cosmic-ray's name, e.g. core/ReplaceComparisonOperator_Lt_LtE
    occurrence: int
    line: int

    @property
    def id(self) -> str:
        return f"{self.module}-{self.operator.removeprefix('core/')}-{self.occurrence}"


@dataclass(frozen=True)
class Result:
    """What happened to one mutant."""

    mutant: Mutant
    outcome: str  # one of OUTCOMES
    diff: str = ""
    services: tuple[str, ...] = ()  # the images rebuilt with it
    killer: str = ""  # the scenario that failed, or "bring-up"
    detail: str = ""  # the failure's first lines, or why it is incompetent
    seconds: float = 0.0


@dataclass(frozen=True)
class MutationPlan:
    """What `python -m harness mutate` was asked for."""

    sample: int
    seed: int
    budget_minutes: float
    only: tuple[str, ...] = ()  # mutant ids: these instead of a sample
    report_dir: Path = ROOT / "reports" / "out"
    run_id: str = field(default_factory=new_run_id)


# -- the mutants ------------------------------------------------------------------------------


def _core_operators() -> list[tuple[str, Any]]:
    """cosmic-ray's operators that take no arguments (`cosmic-ray init` uses the same ones
    unless its configuration gives arguments), each as (name, instance)."""
    operators = []
    for name in plugins.operator_names():
        operator_class = plugins.get_operator(name)
        if not operator_class.arguments():
            operators.append((name, operator_class()))
    return operators


def _statement(node: parso.tree.NodeOrLeaf) -> parso.tree.NodeOrLeaf:
    """The simple statement (or compound statement's header) holding `node`."""
    while node.parent is not None and node.type not in ("simple_stmt", "if_stmt", "while_stmt"):
        node = node.parent
    return node


def _in_annotation(node: parso.tree.NodeOrLeaf) -> bool:
    """Whether `node` is inside a parameter's, a return value's or a variable's annotation."""
    child, parent = node, node.parent
    while parent is not None:
        if parent.type == "tfpdef" and child is parent.children[-1]:  # name: annotation
            return True
        if isinstance(parent, parso.python.tree.Function) and child is parent.annotation:
            return True
        if parent.type == "annassign" and child is parent.children[1]:
            return True
        child, parent = parent, parent.parent
    return False


def seeded_bug_flags(source: str) -> frozenset[str]:
    """Names given `bugs.enabled(...)` in `source` (`self.ack_first = bugs.enabled(...)`,
    `early_ack=bugs.enabled(...)`): true only while that seeded bug is on."""
    return frozenset(re.findall(r"(\w+)\s*=\s*bugs\.enabled\(", source))


def _is_flag(node: parso.tree.NodeOrLeaf, flags: frozenset[str]) -> bool:
    code = node.get_code().strip()
    if re.fullmatch(r"bugs\.enabled\(.*\)", code):
        return True
    return bool(re.fullmatch(r"[\w.]+", code)) and code.split(".")[-1] in flags


def _flag_operand(test: parso.tree.NodeOrLeaf, flags: frozenset[str]) -> bool:
    """Whether `test` is a seeded bug's flag, or an `and` of which one operand is."""
    if test.type == "and_test" and isinstance(test, parso.tree.BaseNode):
        return any(_is_flag(operand, flags) for operand in test.children[::2])
    return _is_flag(test, flags)


def _is_other_operand(
    child: parso.tree.NodeOrLeaf, and_test: parso.tree.BaseNode, flags: frozenset[str]
) -> bool:
    """Whether `child` is an operand (not an `and` keyword) of `and_test` other than its
    flag, while one operand is a flag."""
    is_operand = and_test.children.index(child) % 2 == 0
    return is_operand and not _is_flag(child, flags) and _flag_operand(and_test, flags)


def only_with_a_seeded_bug(node: parso.tree.NodeOrLeaf, flags: frozenset[str]) -> bool:
    """Whether `node` only runs, or only counts, while a seeded bug is on (all are off in the
    run): the first branch of `if <flag>` or `if <flag> and ...`, or another operand of an
    `and` with a flag."""
    child, parent = node, node.parent
    while parent is not None:
        if parent.type == "if_stmt" and isinstance(parent, parso.tree.BaseNode):
            first_test, first_suite = parent.children[1], parent.children[3]
            if child is first_suite and _flag_operand(first_test, flags):
                return True
        in_and = parent.type == "and_test" and isinstance(parent, parso.tree.BaseNode)
        if in_and and _is_other_operand(child, parent, flags):
            return True
        child, parent = parent, parent.parent
    return False


def excluded(
    node: parso.tree.NodeOrLeaf, operator: str, flags: frozenset[str] = frozenset()
) -> str:
    """Why a mutation at `node` cannot change the data path ("" when it can); `flags`: the
    module's seeded bug flags (seeded_bug_flags)."""
    if only_with_a_seeded_bug(node, flags):
        return "code that runs only with a seeded bug on"
    if "_BitOr_" in operator and _in_annotation(node):
        return "a type union in an annotation"
    if node.type == "operator" and node.parent is not None and node.parent.type == "parameters":
        return "the keyword-only marker of a parameter list, not an operator"
    statement = _statement(node).get_code().strip()
    if _REPORTING.search(statement):
        return "a logging or metrics statement"
    return ""


def mutants_of(module: str, source: str) -> list[Mutant]:
    """Every data-path mutant cosmic-ray's operators make of `source`, in its order.

    Occurrences are counted as cosmic-ray counts them (every position of the operator in a
    walk of the tree, excluded ones included), so `mutate_code` applies the same one."""
    tree = get_ast(source)
    nodes = list(ast_nodes(tree))
    flags = seeded_bug_flags(source)
    found = []
    for name, operator in _core_operators():
        occurrence = 0
        for node in nodes:
            for start, _end in operator.mutation_positions(node):
                if not excluded(node, name, flags):
                    found.append(Mutant(module, name, occurrence, start[0]))
                occurrence += 1
    return found


def sample(mutants: Sequence[Mutant], n: int, seed: int) -> list[Mutant]:
    """`n` of `mutants` drawn without replacement by `seed` (all of them when n >= their
    number), in the order drawn: the same seed gives the same mutants and order."""
    return random.Random(seed).sample(list(mutants), min(n, len(mutants)))


class UnknownMutant(ValueError):
    """A mutant id given to `--only` that the sources do not have."""


def chosen_by_id(mutants: Sequence[Mutant], ids: Sequence[str]) -> list[Mutant]:
    """The mutants named by `ids`, in that order; UnknownMutant names every id not found."""
    by_id = {m.id: m for m in mutants}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise UnknownMutant(
            f"no data-path mutant {', '.join(unknown)} in the committed sources "
            f"({len(by_id)} mutants; an id is <module>-<operator>-<occurrence>, as in a "
            "report's mutation.md). If the module changed since that report, its occurrences "
            "moved: find the mutant again by its line and diff in a new run"
        )
    return [by_id[i] for i in ids]


def operator_instance(name: str) -> Any:
    return plugins.get_operator(name)()


def mutated(source: str, mutant: Mutant) -> str:
    """`source` with `mutant` applied (cosmic-ray's mutate_code)."""
    code = mutate_code(source, operator_instance(mutant.operator), mutant.occurrence)
    if code is None:
        raise ValueError(f"cosmic-ray found no position {mutant.id} in {mutant.module}.py")
    return str(code)


def unified_diff(original: str, changed: str, path: str) -> str:
    lines = difflib.unified_diff(
        original.splitlines(keepends=True),
        changed.splitlines(keepends=True),
        fromfile=f"a/{path}",
        tofile=f"b/{path}",
        n=2,
    )
    return "".join(lines)


def imported_modules(source: str) -> set[str]:
    """The qoe modules `source` imports (`from qoe import x`, `from qoe.x import y`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "qoe":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qoe."):
            found.add(str(node.module).removeprefix("qoe."))
    return found


def services_running(module: str, sources: dict[str, str]) -> tuple[str, ...]:
    """The services whose process imports `module` (itself or through other qoe modules):
    the images a mutant of it must be built into. `sources`: qoe module name -> source."""
    imports = {name: imported_modules(code) for name, code in sources.items()}

    def reaches(name: str, seen: frozenset[str] = frozenset()) -> bool:
        if name == module:
            return True
        return any(reaches(dep, seen | {name}) for dep in imports.get(name, set()) - seen)

    return tuple(service for service in SERVICES if reaches(service))


# -- outcomes and the report ----------------------------------------------------------------


def first_failure(junit_xml: Path) -> tuple[str, str]:
    """(test id, first lines of its message) of the first failed or erred test in a junit
    report; ("", "") when none failed or there is no report."""
    if not junit_xml.exists():
        return "", ""
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        for tag in ("failure", "error"):
            failed = case.find(tag)
            if failed is not None:
                name = f"{case.get('classname')}::{case.get('name')}"
                message = (failed.get("message") or failed.text or "").strip()
                return name, "\n".join(message.splitlines()[:6])[:1200]
    return "", ""


def score(results: Sequence[Result]) -> dict[str, Any]:
    """Counts per outcome and the score: (killed + timeout) / (killed + timeout + survived)."""
    counts = Counter(result.outcome for result in results)
    detected = counts["killed"] + counts["timeout"]
    tested = detected + counts["survived"]
    run = [result.seconds for result in results if result.outcome != "not run"]
    return {
        "counts": {outcome: counts[outcome] for outcome in OUTCOMES},
        "tried": len(run),
        "score": round(detected / tested, 4) if tested else None,
        "seconds_per_mutant": round(sum(run) / len(run), 1) if run else None,
    }


def write_report(run_dir: Path, results: Sequence[Result], about: dict[str, Any]) -> Path:
    """`mutation.json` (everything) and `mutation.md` (for a person) in `run_dir`; returns
    the markdown file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = score(results)
    document = {
        **about,
        **summary,
        "mutants": [{**asdict(r), "id": r.mutant.id} for r in results],
    }
    (run_dir / "mutation.json").write_text(json.dumps(document, indent=2) + "\n")
    markdown = run_dir / "mutation.md"
    markdown.write_text(_markdown(results, summary, about))
    return markdown


def _markdown(results: Sequence[Result], summary: dict[str, Any], about: dict[str, Any]) -> str:
    counts = summary["counts"]
    percent = "n/a" if summary["score"] is None else f"{summary['score']:.1%}"
    lines = [
        f"# Mutation run {about.get('run_id', '')}",
        "",
        f"score **{percent}** (killed + timeout over killed + timeout + survived); "
        + ", ".join(f"{outcome} {counts[outcome]}" for outcome in OUTCOMES)
        + f"; {summary['tried']} tried, {summary['seconds_per_mutant']} s per mutant",
        "",
        *(f"- {key}: {value}" for key, value in about.items() if key != "run_id"),
        "",
        "| mutant | line | outcome | images | killed by | s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.mutant.id} | {r.mutant.module}.py:{r.mutant.line} | {r.outcome} | "
            f"{' '.join(r.services)} | {r.killer} | {r.seconds:.0f} |"
        )
    for outcome in ("survived", "timeout", "incompetent", "killed"):
        chosen = [r for r in results if r.outcome == outcome]
        if chosen:
            lines += ["", f"## {outcome}", ""]
        for r in chosen:
            lines += [f"### {r.mutant.id} ({r.mutant.module}.py:{r.mutant.line})", ""]
            if r.killer or r.detail:
                lines += [f"{r.killer}: {r.detail}".strip(": ").replace("\n", " / "), ""]
            lines += ["```diff", r.diff.rstrip(), "```"]
    return "\n".join(lines) + "\n"


# -- the run --------------------------------------------------------------------------------


def _stack_build() -> ModuleType:
    """stack/build.py (a script, not a package) as a module, for its Image and build."""
    spec = importlib.util.spec_from_file_location("qoe_stack_build", ROOT / "stack" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def log(message: str) -> None:
    print(f"[mutate {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def head_commit() -> str:
    """The commit the sources are taken from, for the report: mutant ids hold for it."""
    return subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def snapshot(into: Path, commit: str = "HEAD") -> Path:
    """The services' sources and SQL as committed (`commit`), extracted into `into`:
    colleagues' uncommitted edits do not leak into the run, and nothing in the checkout is
    mutated."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", commit, SERVICES_DIR, SQL_DIR],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


class Images:
    """The run's service images: the snapshot's (`original`) and each mutant's, tagged with the
    run's prefix; removed at the end, with the hash tags of the mutants' builds."""

    def __init__(self, run_id: str, sources: Path) -> None:
        self.build = _stack_build()
        self.client = docker.from_env()
        self.prefix = f"mutate-{run_id}"
        self.sources = sources
        python = self.build.images()[0]  # qoe/python, which build_images() made
        self.base = f"{python.name}:{self.build.content_hash(python)}"
        self.made: list[str] = []

    def _image(self, service: str) -> Any:
        return self.build.Image(
            f"qoe/{service}",
            self.build.STACK / "images" / "service",
            {"qoe": self.sources / SERVICES_DIR, "sql": self.sources / SQL_DIR},
            {"BASE": self.base, "SERVICE": service},
        )

    def make(self, services: Sequence[str], label: str) -> dict[str, str]:
        """Build `services` from the sources as they are now; service -> image reference."""
        refs = {}
        for service in services:
            image = self._image(service)
            tag = f"{self.prefix}-{label}"
            self.build.build(self.client, image, tag)
            refs[service] = f"{image.name}:{tag}"
            self.made.append(refs[service])
            if label != "original":  # a mutant's content hash is its own; the original's is shared
                self.made.append(f"{image.name}:{self.build.content_hash(image)}")
        return refs

    def remove(self) -> None:
        for ref in reversed(self.made):
            try:
                self.client.images.remove(ref, noprune=False)
            except docker.errors.ImageNotFound:
                pass
            except docker.errors.APIError as error:
                log(f"could not remove image {ref}: {error}")


def write_override(path: Path, images: dict[str, str]) -> None:
    """A compose override (JSON is YAML) giving each service's containers their image."""
    services = {
        name: {"image": ref}
        for service, ref in images.items()
        for name in COMPOSE_SERVICES[service]
    }
    path.write_text(json.dumps({"services": services}, indent=2) + "\n")


class MutationRun:
    """One `python -m harness mutate`: the snapshot, the images, the stack and the results."""

    def __init__(self, plan: MutationPlan, work: Path) -> None:
        self.plan = plan
        self.run_dir = plan.report_dir / plan.run_id
        self.commit = head_commit()  # before the snapshot: a colleague may commit meanwhile
        self.sources = snapshot(work / "src", self.commit)
        self.override = work / "images.override.json"
        self.qoe = self.sources / SERVICES_DIR
        self.texts = {p.stem: p.read_text() for p in self.qoe.glob("*.py")}
        self.images: Images | None = None
        self.original: dict[str, str] = {}
        self.stack: ComposeStack | None = None
        # A killed mutant may have left wrong windows of the stack's own probes, which the
        # ledger scenario checks: until that scenario passes again, its failure is not a kill.
        self.dirty = False
        self.test_timeout_s = 600.0

    def mutants(self) -> list[Mutant]:
        every = [m for module in MODULES for m in mutants_of(module, self.texts[module])]
        log(f"{len(every)} data-path mutants in {', '.join(MODULES)}")
        if self.plan.only:
            return chosen_by_id(every, self.plan.only)
        return sample(every, self.plan.sample, self.plan.seed)

    # -- the stack --

    def _fresh_stack(self) -> ComposeStack:
        """A new stack running the original images. A bring-up that fails here is the
        harness's or the machine's failure, not a mutant's."""
        write_override(self.override, self.original)
        stack = ComposeStack(StackOptions(run_id=new_run_id(), compose_overrides=(self.override,)))
        self.stack = stack
        stack.up()
        return stack

    def _use(self, images: dict[str, str]) -> None:
        """The running stack with `images` (the originals elsewhere): compose recreates only
        the containers whose image changed. A StackError here is the mutant's: its services
        did not come up healthy."""
        assert self.stack is not None
        write_override(self.override, {**self.original, **images})
        self.stack.apply(self.stack.settings)

    def _discard_stack(self) -> None:
        self.dirty = False
        if self.stack is not None:
            stack, self.stack = self.stack, None
            stack.down()
            shutil.rmtree(stack.state_dir, ignore_errors=True)  # a failed bring-up's logs

    # -- the test command --

    def _scenarios(self, name: str) -> tuple[int | None, float, Path]:
        """Run the selection against the stack: (pytest's exit status or None on timeout,
        seconds, the junit report)."""
        assert self.stack is not None
        out = self.run_dir / "mutants" / name
        out.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "pytest",
            *SELECTION,
            "--stack",
            "external",
            "--stack-endpoints",
            str(self.stack.endpoints_file),
            "--report-dir",
            str(out),
            "--run-seed",
            str(self.plan.seed),
            "--junit-xml",
            str(out / "junit.xml"),
            "-x",
            "-q",
        ]
        started = time.monotonic()
        with (out / "pytest.log").open("w") as output:
            process = subprocess.Popen(
                command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                status: int | None = process.wait(timeout=self.test_timeout_s)
            except subprocess.TimeoutExpired:
                status = None
                process.terminate()  # the plugin's SIGTERM path: its teardown runs
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        return status, time.monotonic() - started, out / "junit.xml"

    def baseline(self) -> float:
        """Run the selection on the unmutated services; its time sets the mutants' limit."""
        self._fresh_stack()
        status, seconds, junit = self._scenarios("baseline")
        if status != 0:
            failed, message = first_failure(junit)
            raise StackError(
                f"the scenarios fail on the unmutated services (exit {status}; {failed}: "
                f"{message}); every mutant would look killed. Fix that first (report: "
                f"{junit.parent})"
            )
        self.test_timeout_s = 3 * seconds + 60
        log(
            f"baseline passed in {seconds:.0f} s; a mutant's scenarios time out after "
            f"{self.test_timeout_s:.0f} s"
        )
        return seconds

    # -- one mutant --

    def test(self, mutant: Mutant) -> Result:
        started = time.monotonic()
        path = self.qoe / f"{mutant.module}.py"
        original = self.texts[mutant.module]
        try:
            code = mutated(original, mutant)
        except ValueError as error:
            return Result(mutant, "incompetent", detail=str(error))
        diff = unified_diff(original, code, f"{SERVICES_DIR}/{mutant.module}.py")
        services = services_running(mutant.module, self.texts)
        result = Result(mutant, "incompetent", diff, services)
        try:
            compile(code, str(path), "exec")
        except SyntaxError as error:
            return replace(result, detail=f"not valid Python: {error}")
        assert self.images is not None
        path.write_text(code)
        try:
            images = self.images.make(services, mutant.id.lower())
        finally:
            path.write_text(original)
        if self.stack is None:
            self._fresh_stack()
        was_dirty = self.dirty
        try:
            self._use(images)
        except StackError as error:
            self.dirty = True
            return replace(
                result,
                outcome="killed",
                killer="bring-up",
                detail=str(error)[:600],
                seconds=time.monotonic() - started,
            )
        status, _, junit = self._scenarios(mutant.id)
        result = self._verdict(result, status, junit)
        if result.outcome == "survived":
            self.dirty = False  # the ledger scenario passed: the probes' windows are right
        elif result.outcome == "timeout":
            self._discard_stack()  # stopped mid-scenario: the probes may be left stopped
        elif result.killer == LEDGER_SCENARIO and was_dirty:
            log(
                f"{mutant.id} failed only the ledger scenario on a stack a killed mutant ran on: "
                "testing it again on a fresh stack"
            )
            self._discard_stack()
            return self.test(mutant)
        else:
            self.dirty = True
        return replace(result, seconds=time.monotonic() - started)

    def _verdict(self, result: Result, status: int | None, junit: Path) -> Result:
        failed, message = first_failure(junit)
        if status is None:
            return replace(result, outcome="timeout", killer=failed, detail=message)
        if status == 0:
            return replace(result, outcome="survived")
        if status == 1 and failed:
            return replace(result, outcome="killed", killer=failed, detail=message)
        detail = f"pytest exit {status} ({failed} {message}); see {junit.parent}"
        return replace(result, outcome="incompetent", detail=detail)

    def run(self) -> list[Result]:
        chosen = self.mutants()
        started = time.monotonic()
        deadline = started + self.plan.budget_minutes * 60
        results: list[Result] = []
        build_images()  # the stack's own images, and qoe/python, which the service images use
        self.images = Images(self.plan.run_id, self.sources)
        self.original = self.images.make(SERVICES, "original")
        baseline_s = self.baseline()
        for index, mutant in enumerate(chosen):
            if time.monotonic() >= deadline:
                results += [Result(m, "not run") for m in chosen[index:]]
                log(f"time budget spent: {len(chosen) - index} sampled mutants not run")
                break
            result = self.test(mutant)
            results.append(result)
            log(
                f"{index + 1}/{len(chosen)} {mutant.id}: {result.outcome} {result.killer} "
                f"({result.seconds:.0f} s)"
            )
            self.report(results, baseline_s, started)
        self.report(results, baseline_s, started)
        return results

    def report(self, results: Sequence[Result], baseline_s: float, started: float) -> Path:
        return write_report(
            self.run_dir,
            results,
            {
                "run_id": self.plan.run_id,
                "seed": self.plan.seed,
                "sample": list(self.plan.only) if self.plan.only else self.plan.sample,
                "commit": self.commit,
                "budget_minutes": self.plan.budget_minutes,
                "modules": list(MODULES),
                "selection": " ".join(SELECTION),
                "baseline_s": round(baseline_s, 1),
                "elapsed_s": round(time.monotonic() - started, 1),
                "machine": machine(),
            },
        )

    def close(self) -> None:
        self._discard_stack()
        if self.images is not None:
            self.images.remove()


def machine() -> str:
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return f"{platform.node()}: {os.cpu_count()} CPUs, load average {load}"


def run_mutations(plan: MutationPlan) -> int:
    """`python -m harness mutate`: run the plan, write the report; 0 when it ran."""
    with tempfile.TemporaryDirectory(prefix="qoe-mutate-") as work:
        run = MutationRun(plan, Path(work))
        try:
            results = run.run()
        except UnknownMutant as error:
            log(str(error))
            return 2
        finally:
            run.close()
    summary = score(results)
    log(f"{summary['counts']}; score {summary['score']}; report {run.run_dir / 'mutation.md'}")
    return 0
