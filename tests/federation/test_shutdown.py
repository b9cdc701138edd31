"""Graceful shutdown: SIGTERM stops each service cleanly, finishing or safely abandoning its work.

uvicorn stops accepting connections on SIGTERM and lets the requests in flight finish; then
each service's lifespan stops its background threads and closes its store. Work that a request
had started is finished (a relink asked for just before the signal completes and its alerts
are committed); work in the background is abandoned where it is safe to (an unacknowledged
batch or alert stays queued and is sent again after the restart, where it counts once).
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from federation.demo import LocalFederation
from linkage.synthetic import generate_federation, write_federation

pytestmark = pytest.mark.slow

TIMEOUT = 90.0


def _wait(predicate: Any, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _stop(local: LocalFederation, name: str) -> float:
    """SIGTERM a party and check that it stopped cleanly; return the seconds it took.

    Clean means: it exited by the signal (uvicorn re-raises SIGTERM once it has shut down) or
    with status 0, logged no error, and closed its database, which checkpoints it and removes
    the write-ahead log (a SIGKILL leaves it behind, to be replayed at the next start).
    """
    started = time.monotonic()
    code = local.terminate(name, timeout=60)
    assert code in (0, -signal.SIGTERM), f"{name} exited with {code}"
    log = local.party(name).log.read_text(errors="replace")
    assert "Traceback" not in log, f"{name} logged an error while stopping"
    folder = local.out / "matcher" if name == "matcher" else local.out / "nodes" / name
    (database,) = folder.glob("*.duckdb")
    assert database.exists() and not database.with_suffix(".duckdb.wal").exists()
    return time.monotonic() - started


def test_sigterm_stops_both_services_cleanly_and_loses_nothing(tmp_path: Path) -> None:
    fed = generate_federation(counties=2, records=500, seed=41)
    files = sorted(write_federation(fed, tmp_path / "counties"))
    accepted = {f.stem: len(pd.read_csv(f, dtype=str)) for f in files}
    a, b = (f.stem for f in files)
    with LocalFederation(
        tmp_path / "fed",
        [a, b],
        seeds={a: 1, b: 2},
        node_settings={"batch_size": 20, "publish_interval": 0.05, "retry_max_seconds": 1.0},
        matcher_settings={"retry_max_seconds": 1.0},
    ) as local:
        # The matcher stops while the nodes publish: batches it was storing are stored and
        # acknowledged, the others stay in the nodes' outboxes.
        ingest = threading.Thread(target=local.ingest_all, args=(files,))
        ingest.start()
        _wait(lambda: local.status()["tokens"] > 0, "the first batch")
        assert _stop(local, "matcher") < 30
        ingest.join(TIMEOUT)
        pending = sum(local.node_status(c)["outbox"]["pending"] for c in (a, b))
        assert pending > 0
        local.restart("matcher")
        local.wait_for_tokens(sum(accepted.values()), TIMEOUT)

        # A node stops while it publishes a load of changes; it sends the rest after restart.
        export = pd.read_csv(files[0], dtype=str, keep_default_na=False)
        changed = tmp_path / "changed" / files[0].name
        changed.parent.mkdir()
        export.assign(postcode="").to_csv(changed, index=False)  # every record changes
        report = local.ingest(a, changed)
        assert report["upserts"] > 100 and report["batches"] > 5
        assert _stop(local, a) < 30
        local.restart(a)
        local.wait_until_published(TIMEOUT)
        assert local.status()["counties"] == accepted

        # The matcher is asked to link and stops straight away: the request in flight is
        # finished, alerts included, and delivered after the restart.
        result: dict[str, Any] = {}

        def relink() -> None:
            try:
                result.update(local.relink(retrain=True))
            except httpx.HTTPError as e:  # pragma: no cover - reported by the assert below
                result["error"] = repr(e)

        asking = threading.Thread(target=relink)
        asking.start()
        log = local.party("matcher").log
        _wait(lambda: "relink asked for" in log.read_text(errors="replace"), "the relink to start")
        _stop(local, "matcher")
        asking.join(TIMEOUT)
        assert result.get("status") == "linked", result
        local.restart("matcher")
        local.wait_until_delivered(TIMEOUT)
        status = local.status()
        assert status["alerts_delivered"] == result["alerts_queued"] > 0
        shown = {c: local.alerts(c) for c in (a, b)}
        assert sum(len(v) for v in shown.values()) == result["alerts_queued"]
        for alerts in shown.values():
            assert len({x["alert_id"] for x in alerts}) == len(alerts)

        # Both nodes stop cleanly too, with nothing left to send.
        for county in (a, b):
            metrics = local.client.get(f"{local.nodes[county].url}/metrics").text
            assert 'jigsaw_node_outbox_pending{kind="token_batch"} 0' in metrics
            assert _stop(local, county) < 30
