"""The nemesis against a fake Toxiproxy (its documented HTTP API, in-process): faults heal
also when the body fails, each is recorded in the history with its clock, toxic
attributes are checked, and upstream moves use POST /proxies/{name}."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest

from harness.history import History
from harness.nemesis import Nemesis, NemesisError
from harness.nemesis.links import LINKS, TIERS, proxies_of, toxic_attributes
from harness.stack import Endpoints

PROXIES = sorted({p for names in LINKS.values() for p in names})


class FakeToxiproxy(BaseHTTPRequestHandler):
    """GET /proxies, GET/POST /proxies/{name}, POST/DELETE toxics: enough of Toxiproxy's API."""

    state: ClassVar[dict] = {}
    calls: ClassVar[list] = []

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def do_GET(self) -> None:
        parts = self.path.strip("/").split("/")
        if parts == ["proxies"]:
            return self._send(200, self.state)
        if len(parts) == 2 and parts[1] in self.state:
            return self._send(200, self.state[parts[1]])
        if len(parts) == 3 and parts[2] == "toxics":
            return self._send(200, self.state[parts[1]]["toxics"])
        self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        parts = self.path.strip("/").split("/")
        body = self._body()
        self.calls.append(("POST", self.path, body))
        if parts == ["reset"]:
            return self._send(204, None)
        proxy = self.state.get(parts[1]) if len(parts) > 1 else None
        if proxy is None:
            return self._send(404, {"error": "proxy not found"})
        if len(parts) == 2:
            proxy.update({k: v for k, v in body.items() if k in ("enabled", "upstream")})
            return self._send(200, proxy)
        if body["type"] == "bogus":
            return self._send(400, {"error": "bad toxic"})
        proxy["toxics"].append(body)
        return self._send(200, body)

    def do_DELETE(self) -> None:
        parts = self.path.strip("/").split("/")
        self.calls.append(("DELETE", self.path, None))
        toxics = self.state[parts[1]]["toxics"]
        found = [t for t in toxics if t["name"] == parts[3]]
        if not found:
            return self._send(404, {"error": "toxic not found"})
        toxics.remove(found[0])
        self._send(204, None)


@pytest.fixture
def toxiproxy():
    FakeToxiproxy.state = {
        name: {"name": name, "listen": "0", "upstream": "x:1", "enabled": True, "toxics": []}
        for name in PROXIES
    }
    FakeToxiproxy.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeToxiproxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.fixture
def nemesis(toxiproxy) -> Nemesis:
    endpoints = Endpoints(
        ingest_urls=("http://127.0.0.1:1",),
        ingest_token="t",
        database_dsn="postgresql://x@127.0.0.1:1/qoe",
        toxiproxy_url=f"http://127.0.0.1:{toxiproxy.server_address[1]}",
    )
    stack = SimpleNamespace(name="qoe-test", settings=SimpleNamespace(sync_replication=True))
    return Nemesis(stack, endpoints, History())  # type: ignore[arg-type]


def state(name: str) -> dict:
    return FakeToxiproxy.state[name]


def test_links_and_tiers_name_real_proxies():
    configured = {
        p["name"] for p in json.loads(Path("stack/images/toxiproxy/proxies.json").read_text())
    }
    assert {p for names in LINKS.values() for p in names} <= configured
    assert {p for names in TIERS.values() for p in names} <= configured
    assert proxies_of("tier:nats") == list(dict.fromkeys(TIERS["nats"]))
    assert proxies_of(["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match="unknown link"):
        proxies_of("nope")
    with pytest.raises(ValueError, match="unknown tier"):
        proxies_of("tier:nope")


def test_toxic_attributes_are_checked_and_defaulted():
    assert toxic_attributes("latency", latency=100) == {"latency": 100, "jitter": 0}
    assert toxic_attributes("slicer", average_size=10)["size_variation"] == 0
    with pytest.raises(ValueError, match="unknown toxic"):
        toxic_attributes("explode")
    with pytest.raises(ValueError, match="unknown"):
        toxic_attributes("bandwidth", speed=1)


def test_cut_disables_every_proxy_and_heals_when_the_body_fails(nemesis):
    with pytest.raises(RuntimeError, match="boom"), nemesis.cut("ingest-nats") as fault:
        assert not any(state(p)["enabled"] for p in LINKS["ingest-nats"])
        raise RuntimeError("boom")
    assert all(state(p)["enabled"] for p in LINKS["ingest-nats"])
    assert fault.effect_s is not None and fault.heal_s is not None and fault.duration_s >= 0
    assert nemesis.history.faults() == (fault,)
    assert fault.name == "cut ingest-nats" and fault.healed_at is not None
    assert fault.started_at <= fault.healed_at <= (fault.ended_at or 0)


def test_effect_is_awaited_and_heals_when_it_never_comes(nemesis):
    with (
        pytest.raises(AssertionError, match="taking effect"),
        nemesis.fault(
            "never", "", inject=lambda: None, heal=[], effect=lambda: False, effect_timeout_s=0.2
        ),
    ):
        pass  # pragma: no cover
    assert nemesis.faults[-1].heal_s is not None


def test_toxics_in_both_directions_are_added_and_removed(nemesis):
    with nemesis.latency("aggregator-postgres", 800, 400, stream="both"):
        toxics = state("aggregator_postgres")["toxics"]
        assert {(t["stream"], t["type"]) for t in toxics} == {
            ("upstream", "latency"),
            ("downstream", "latency"),
        }
        assert toxics[0]["attributes"] == {"latency": 800, "jitter": 400}
    assert state("aggregator_postgres")["toxics"] == []


@pytest.mark.parametrize(
    "call, kind",
    [
        (lambda n: n.bandwidth("harness-ingest", 10), "bandwidth"),
        (lambda n: n.timeout("harness-ingest", 500), "timeout"),
        (lambda n: n.reset_peer("harness-ingest", 50, stream="upstream"), "reset_peer"),
        (lambda n: n.slow_close("harness-ingest", 100), "slow_close"),
        (lambda n: n.slicer("harness-ingest", 64, 32, 10), "slicer"),
        (lambda n: n.limit_data("harness-ingest", 64), "limit_data"),
    ],
)
def test_every_toxic_kind(nemesis, call, kind):
    with call(nemesis):
        assert {t["type"] for t in state("harness_ingest1")["toxics"]} == {kind}
    assert state("harness_ingest1")["toxics"] == []


def test_a_toxic_that_fails_part_way_still_heals(nemesis):
    # The second proxy is missing: the first one's toxic was added and must be removed.
    del FakeToxiproxy.state["harness_ingest2"]
    with pytest.raises(KeyError), nemesis.latency("harness-ingest", 5):
        pass  # pragma: no cover
    assert state("harness_ingest1")["toxics"] == []


def test_upstream_moves_go_through_the_http_api(nemesis):
    nemesis.move_upstream(["harness_postgres"], "postgres-replica:5432")
    assert state("harness_postgres")["upstream"] == "postgres-replica:5432"
    assert state("harness_postgres")["enabled"]
    posted = [body for method, path, body in FakeToxiproxy.calls if path.endswith("postgres")]
    assert {"upstream": "postgres-replica:5432"} in posted
    with nemesis.upstream_moved(["aggregator_postgres"], "elsewhere:1"):
        assert nemesis.upstream("aggregator_postgres") == "elsewhere:1"
    assert nemesis.upstream("aggregator_postgres") == "x:1"


def test_unknown_proxy_is_a_clear_error(nemesis):
    with pytest.raises(NemesisError, match="has no proxy"), nemesis.cut(["nope"]):
        pass  # pragma: no cover
