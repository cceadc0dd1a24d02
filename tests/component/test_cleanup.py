"""What a killed run leaves behind is removed by the next run, and only the harness's own resources."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys

import docker
import pytest

from harness.stack import PID_LABEL, RUN_LABEL, STATE_DIR, StackOptions, open_stack, reap_orphans

pytestmark = pytest.mark.component


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_resources_of_a_dead_run_are_reaped_and_others_kept():
    client = docker.from_env()
    dead = {RUN_LABEL: "killed-run", PID_LABEL: str(dead_pid())}
    kept = {RUN_LABEL: "kept-stack", PID_LABEL: "0"}
    created = []
    secrets = STATE_DIR / "qoe-killed-run" / "stack.env"
    secrets.parent.mkdir(parents=True, exist_ok=True)
    secrets.write_text("POSTGRES_PASSWORD=x\n")
    try:
        for labels in (dead, kept):
            network = client.networks.create(f"qoe-test-{labels[RUN_LABEL]}", labels=labels)
            volume = client.volumes.create(f"qoe-test-{labels[RUN_LABEL]}", labels=labels)
            container = client.containers.create(
                "debian:bookworm-slim", "true", labels=labels, network=network.name
            )
            created.append((labels, container, network, volume))
        reaped = reap_orphans(client)
        assert "killed-run" in reaped and "kept-stack" not in reaped
        containers = {c.id for c in client.containers.list(all=True)}
        networks = {n.id for n in client.networks.list()}
        volumes = {v.id for v in client.volumes.list()}
        for labels, container, network, volume in created:
            alive = labels is kept
            assert (container.id in containers) is alive, labels
            assert (network.id in networks) is alive, labels
            assert (volume.id in volumes) is alive, labels
        assert not secrets.parent.exists(), "the killed run's secrets were left in .run"
    finally:
        shutil.rmtree(secrets.parent, ignore_errors=True)
        for _, container, network, volume in created:
            for remove in (lambda c=container: c.remove(force=True), network.remove, volume.remove):
                with contextlib.suppress(docker.errors.NotFound):
                    remove()


def test_down_with_no_stack_up_removes_what_carries_its_label(tmp_path):
    """`python -m harness down` with no kept stack: no compose project to parse, no traceback,
    and anything labelled with the run still goes."""
    client = docker.from_env()
    stack = open_stack(StackOptions(run_id="never-up", state_dir=tmp_path))
    volume = client.volumes.create("qoe-test-never-up", labels={RUN_LABEL: "never-up"})
    try:
        stack.down()
        assert volume.id not in {v.id for v in client.volumes.list()}
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            volume.remove()
