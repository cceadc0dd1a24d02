"""Container events of a run (start, die, kill, oom, health changes) recorded into its timeline."""

from __future__ import annotations

import threading
from types import TracebackType

import docker

from harness.history import Mark, Timeline
from harness.stack import RUN_LABEL

RECORDED = {
    "create",
    "start",
    "die",
    "kill",
    "oom",
    "stop",
    "restart",
    "pause",
    "unpause",
    "destroy",
}


class ContainerEventRecorder:
    """Streams the docker events of one run's containers into a timeline until closed."""

    def __init__(self, run_id: str, timeline: Timeline) -> None:
        self.run_id = run_id
        self.timeline = timeline
        self._client = docker.from_env()
        self._stream = self._client.events(
            decode=True, filters={"type": "container", "label": f"{RUN_LABEL}={run_id}"}
        )
        self._thread = threading.Thread(target=self._pump, name="docker-events", daemon=True)

    def _pump(self) -> None:
        try:
            for event in self._stream:
                self._record(event)
        except Exception:  # the stream ends with an error when closed; nothing to report
            return

    def _record(self, event: dict) -> None:
        action = str(event.get("Action", ""))
        base = action.split(":", 1)[0].strip()
        if base not in RECORDED and not action.startswith("health_status"):
            return
        attributes = event.get("Actor", {}).get("Attributes", {})
        service = attributes.get("com.docker.compose.service") or attributes.get("name", "?")
        detail = f"exit code {attributes['exitCode']}" if "exitCode" in attributes else ""
        at = event.get("timeNano", 0) / 1e9 or float(event.get("time", 0))
        self.timeline.append(
            Mark(at=at, source="docker", name=f"{service} {action}", detail=detail)
        )

    def __enter__(self) -> ContainerEventRecorder:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stream.close()
        self._thread.join(timeout=5)
