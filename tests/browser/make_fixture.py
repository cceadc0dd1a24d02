"""Makes tests/browser/data/summary.json from a real run folder: the page tests read a real run's
data, re-rendered by the current code. Run once after a real failing run, e.g.

    AGGREGATOR_SEEDED_BUGS=aggregator_no_dedup .venv/bin/python -m pytest \
        scenarios/test_dedup.py scenarios/test_partitions.py::test_ingest_nats_partition \
        scenarios/test_restarts.py::test_repeated_sigkill_of_aggregators_mid_batch \
        tests/unit/harness/test_history.py
    .venv/bin/python tests/browser/make_fixture.py reports/out/<run-id>

Service logs are cut to their last lines and the run's secrets (tokens, passwords, which a
failed test's output may show) are replaced, so nothing secret is committed.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

DATA = Path(__file__).with_name("data") / "summary.json"
LOG_LINES = 15
SECRET = re.compile(r"(token=|password=|://[^:/@\s]+:)(['\"]?)[A-Za-z0-9_\-.]{6,}")


def scrub(text: str) -> str:
    return SECRET.sub(lambda m: f"{m[1]}{m[2]}<secret>", text)


def main(run_dir: str) -> None:
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    for scenario in summary["scenarios"]:
        scenario["logs"] = {
            name: "\n".join(text.splitlines()[-LOG_LINES:])
            for name, text in scenario["logs"].items()
        }
    DATA.parent.mkdir(exist_ok=True)
    DATA.write_text(scrub(json.dumps(summary, indent=1)) + "\n")
    print(f"{DATA}: {DATA.stat().st_size} bytes from {run_dir}")


if __name__ == "__main__":
    main(*sys.argv[1:])
