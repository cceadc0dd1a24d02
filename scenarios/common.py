"""Workload patterns shared by scenarios."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from harness.history import Operation
from harness.polling import wait_until
from harness.workload import EventGenerator, IngestClient


@contextmanager
def background_sender(
    client: IngestClient, generator: EventGenerator, batch_size: int = 200
) -> Iterator[list[Operation]]:
    """Send batches back to back on a thread for the body; yields the growing list of operations."""
    sent: list[Operation] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            sent.append(client.send(generator.batch(batch_size)))

    thread = threading.Thread(target=loop, name="background-sender", daemon=True)
    thread.start()
    try:
        yield sent
    finally:
        stop.set()
        thread.join(timeout=30)


def wait_for_progress(sent: list[Operation], more: int = 3, timeout_s: float = 30.0) -> float:
    """Wait until the background sender has completed `more` operations; returns seconds waited."""
    before = len(sent)
    return wait_until(
        lambda: len(sent) >= before + more, timeout_s=timeout_s, what=f"{more} more batches sent"
    )[1]
