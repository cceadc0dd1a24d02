"""The command-line face of the harness: `python -m harness up|down|status|run|report|build`."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import docker

from harness.stack import ROOT, RUN_LABEL, ComposeStack, reap_orphans

REUSE_PROJECT = "qoe-dev"
SUITES: dict[str, list[str]] = {
    "smoke": ["scenarios", "-m", "smoke"],
    "e2e": ["scenarios", "-m", "e2e"],
    "dedup": ["scenarios", "-m", "dedup"],
    "chaos": ["scenarios", "-m", "(chaos or partition or restart or failover) and not slow"],
    "load": ["scenarios", "-m", "load and not slow"],
    "full": ["tests", "scenarios"],
    "ci": ["tests", "scenarios", "-m", "not slow"],
}


def _dev_stack() -> ComposeStack:
    return ComposeStack(
        run_id=REUSE_PROJECT, project=REUSE_PROJECT, state_dir=ROOT / ".run", keep=True
    )


def cmd_up(args: argparse.Namespace) -> int:
    stack = _dev_stack()
    stack.up()
    print(f"stack {stack.name} is up; endpoints: {stack.endpoints_file}")
    print("run scenarios against it with: python -m harness run smoke --reuse-stack")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stack = _dev_stack()
    stack.keep = False
    stack.down()
    reap_orphans()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    client = docker.from_env()
    containers = client.containers.list(all=True, filters={"label": RUN_LABEL})
    if not containers:
        print("no harness stack is running")
        return 0
    for container in sorted(containers, key=lambda c: c.name):
        health = container.attrs["State"].get("Health", {}).get("Status", "-")
        print(
            f"{container.labels[RUN_LABEL]:28} {container.name:45} {container.status:10} {health}"
        )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    command = [sys.executable, "-m", "pytest", *SUITES[args.suite], *args.pytest_args]
    print("running:", " ".join(command), flush=True)
    return subprocess.call(command, cwd=ROOT)


def cmd_report(args: argparse.Namespace) -> int:
    from harness.report import render

    run_dir = args.run_dir or max((ROOT / "reports" / "out").iterdir(), key=lambda p: p.name)
    print(render(Path(run_dir)))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    return subprocess.call([sys.executable, str(ROOT / "stack" / "build.py")])


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help=f"bring up a kept stack ({REUSE_PROJECT}) for local iteration")
    sub.add_parser("down", help="remove the kept stack and anything killed runs left behind")
    sub.add_parser("status", help="list the harness's containers")
    run = sub.add_parser("run", help="run a suite of scenarios with pytest")
    run.add_argument("suite", choices=sorted(SUITES))
    run.add_argument("pytest_args", nargs=argparse.REMAINDER, help="passed on to pytest")
    report = sub.add_parser("report", help="re-render a run's summary (default: the latest run)")
    report.add_argument("run_dir", nargs="?", type=Path)
    sub.add_parser("build", help="build the reference stack's images")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    handlers = {
        "up": cmd_up,
        "down": cmd_down,
        "status": cmd_status,
        "run": cmd_run,
        "report": cmd_report,
        "build": cmd_build,
    }
    return handlers[args.command](args)
