"""Crashes and outages with real processes: nothing lost, nothing duplicated (invariant 4).

A fault-free federation and faulty ones run the same two phases on the same files, with the same
federation secret and the same bit-flip seeds:

1. every county ingests its export (in many small token batches), the matcher trains and links,
   alerts go out;
2. one county loads a changed export (new records that link to another county, removed and
   altered records that were linked): one token batch, scored incrementally, new alerts and
   withdrawals go out.

The faulty runs SIGKILL the matcher while nodes publish, while it delivers alerts (with one node
frozen so that a delivery is caught in flight) and while it scores; SIGKILL a node with a token
batch in flight; and take nodes down while alerts queue for them. After each phase, the outcome
must equal the fault-free one exactly: the same tokens per county (every accepted record indexed
once), the same people and families (membership as sets of county and local id), and the same
alerts, each once, in every inbox.

Pseudonyms and cluster ids are random per run, so alerts are compared by what a county sees:
kind, its own record or household id, status, version, probability and the other counties.

Crashes at precise points between two steps, which a SIGKILL hits only by chance (after a
scoring round's clustering, before its alerts; after a label, before its alert updates), are
injected in-process in ``test_matcher_app.py``.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import psutil
import pytest

from federation.demo import LocalFederation
from federation.keys import generate_federation_secret
from linkage.synthetic import generate_federation, write_federation

pytestmark = pytest.mark.slow

#: Small batches, so that publishing takes long enough to be interrupted.
NODE_SETTINGS = {"batch_size": 20, "publish_interval": 0.05, "retry_max_seconds": 1.0}
MATCHER_SETTINGS = {"retry_max_seconds": 1.0}
TIMEOUT = 90.0


# --------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class World:
    """Three county exports, a changed export for phase 2, and the secret and seeds."""

    files: list[Path]
    changed: Path
    secret: bytes
    seeds: dict[str, int]
    accepted: dict[str, int]  # records each county holds after phase 1
    accepted_after: dict[str, int]  # ... and after phase 2

    @property
    def counties(self) -> list[str]:
        return [f.stem for f in self.files]

    def federation(self, out: Path) -> LocalFederation:
        return LocalFederation(
            out,
            self.counties,
            seeds=self.seeds,
            secret=self.secret,
            node_settings=NODE_SETTINGS,
            matcher_settings=MATCHER_SETTINGS,
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("crash_world")
    fed = generate_federation(counties=3, records=900, seed=21)
    files = sorted(write_federation(fed, root / "counties", truth_path=root / "truth.csv"))
    county, source = files[0].stem, files[1].stem
    truth = fed.truth
    export = pd.read_csv(files[0], dtype=str, keep_default_na=False)
    elsewhere = set(truth.loc[truth["county"] != county, "person_id"])
    mine = truth[truth["county"] == county]
    linked = sorted(mine.loc[mine["person_id"].isin(elsewhere), "record_id"])
    assert len(linked) >= 6
    # Four linked records removed (their alerts are withdrawn everywhere) and two altered
    # beyond recognition (they no longer link).
    removed, altered = linked[:4], linked[4:6]
    export = export[~export["record_id"].isin(removed)].copy()
    hit = export["record_id"].isin(altered)
    export.loc[hit, "given_name"] = ["Zebedee", "Xanthe"]
    export.loc[hit, "family_name"] = "Quaverley"
    export.loc[hit, "date_of_birth"] = "1931-02-03"
    export.loc[hit, "nhs_number"] = ""
    export.loc[hit, "previous_family_names"] = ""
    # Eight people known to the second county only now become known here too.
    theirs = truth[truth["county"] == source]
    here = set(mine["person_id"])
    newcomers = sorted(theirs.loc[~theirs["person_id"].isin(here), "record_id"])[:8]
    other = pd.read_csv(files[1], dtype=str, keep_default_na=False)
    fresh = other[other["record_id"].isin(newcomers)].copy()
    fresh["record_id"] = [f"NEW-{i:03d}" for i in range(len(fresh))]
    fresh["household_id"] = "NEW-" + fresh["household_id"]
    changed = root / "changed" / files[0].name
    changed.parent.mkdir()
    pd.concat([export, fresh]).to_csv(changed, index=False)
    accepted = {f.stem: len(pd.read_csv(f, dtype=str)) for f in files}
    after = {**accepted, county: accepted[county] - len(removed) + len(fresh)}
    return World(
        files=files,
        changed=changed,
        secret=generate_federation_secret(),
        seeds={f.stem: 100 + i for i, f in enumerate(files)},
        accepted=accepted,
        accepted_after=after,
    )


# --------------------------------------------------------------------------- observing


AlertView = tuple[str, str, str, int, float, tuple[str, ...]]


@dataclass(frozen=True)
class Outcome:
    """What a federation holds after a phase, free of random pseudonyms and ids."""

    tokens: dict[str, int]
    alerts: dict[str, frozenset[AlertView]]
    people: frozenset[frozenset[tuple[str, str]]]
    families: frozenset[frozenset[tuple[str, str]]]

    def counts(self) -> dict[str, Any]:
        statuses = defaultdict(int)
        for views in self.alerts.values():
            for view in views:
                statuses[f"{view[0]}/{view[2]}"] += 1
        return {"people": len(self.people), "families": len(self.families), **statuses}


def _observe(local: LocalFederation, expected_tokens: dict[str, int]) -> Outcome:
    """Read every inbox and the matcher's status; check what must hold within one run."""
    status = local.status()
    assert status["pending"] == 0 and status["alerts_pending"] == 0, status
    # Every accepted record is indexed exactly once, and nothing else is.
    assert status["counties"] == expected_tokens
    assert status["tokens"] == sum(expected_tokens.values())
    alerts: dict[str, frozenset[AlertView]] = {}
    people: dict[str, set[tuple[str, str]]] = defaultdict(set)
    families: dict[str, set[tuple[str, str]]] = defaultdict(set)
    shown = 0
    for county in local.nodes:
        node = local.node_status(county)
        assert node["records"]["active"] == expected_tokens[county]
        assert node["outbox"]["pending"] == 0
        inbox = local.alerts(county)
        shown += len(inbox)
        ids = [a["alert_id"] for a in inbox]
        assert len(ids) == len(set(ids)), f"{county}: an alert is shown twice"
        views = []
        for a in inbox:
            local_id = a["local_record_id"] if a["kind"] == "person" else a["local_household_id"]
            assert local_id is not None, a["alert_id"]
            others = tuple(sorted(o["county"] for o in a["other_counties"]))
            views.append(
                (a["kind"], local_id, a["status"], a["version"], a["match_probability"], others)
            )
            if a["status"] != "withdrawn":
                groups = people if a["kind"] == "person" else families
                groups[a["cluster_id"]].add((county, local_id))
        # One alert per record or household: a subject shown twice is a duplicate too.
        assert len({(v[0], v[1]) for v in views}) == len(views), f"{county}: repeated subject"
        alerts[county] = frozenset(views)
    # Every alert the matcher holds was delivered, and every one delivered is shown once.
    assert status["alerts_delivered"] == shown
    return Outcome(
        tokens=dict(status["counties"]),
        alerts=alerts,
        people=frozenset(frozenset(m) for m in people.values()),
        families=frozenset(frozenset(m) for m in families.values()),
    )


def _assert_same(actual: Outcome, expected: Outcome) -> None:
    assert actual.tokens == expected.tokens
    assert actual.people == expected.people, "person clusters differ from the fault-free run"
    assert actual.families == expected.families, "families differ from the fault-free run"
    for county, views in expected.alerts.items():
        missing = sorted(views - actual.alerts[county])
        extra = sorted(actual.alerts[county] - views)
        assert not missing and not extra, f"{county}: missing {missing[:5]}, extra {extra[:5]}"


def _wait(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _link_and_deliver(local: LocalFederation, world: World) -> None:
    local.wait_for_tokens(sum(world.accepted.values()), TIMEOUT)
    summary = local.relink(retrain=True)
    assert summary["status"] == "linked"
    local.wait_until_delivered(TIMEOUT)


def _outbox_pending(local: LocalFederation, county: str) -> int:
    return int(local.node_status(county)["outbox"]["pending"])


def _sending(local: LocalFederation, county: str) -> bool:
    """Whether a node has a connection open to the matcher (its publisher is sending)."""
    process = local.nodes[county].process
    assert process is not None
    port = httpx.URL(local.matcher.url).port
    return any(
        c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
        for c in psutil.Process(process.pid).net_connections(kind="tcp")
    )


def _metric(local: LocalFederation, name: str, party: str = "matcher") -> float:
    """A sample from a party's /metrics (``name`` with its labels, as exposed)."""
    text = local.client.get(f"{local.party(party).url}/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


# --------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def fault_free(world: World, tmp_path_factory: pytest.TempPathFactory) -> tuple[Outcome, Outcome]:
    out = tmp_path_factory.mktemp("fault_free")
    with world.federation(out) as local:
        local.ingest_all(world.files)
        _link_and_deliver(local, world)
        first = _observe(local, world.accepted)
        report = local.ingest(world.counties[0], world.changed)
        assert (report["upserts"], report["tombstones"], report["batches"]) == (10, 4, 1)
        local.wait_until_delivered(TIMEOUT)
        second = _observe(local, world.accepted_after)
    # The scenario exercises what it claims to: links, families, new alerts, withdrawals.
    assert len(first.people) >= 50 and len(first.families) >= 20, first.counts()
    assert second.counts().get("person/withdrawn", 0) >= 4, second.counts()
    assert second.counts()["person/open"] > first.counts()["person/open"] - 6, second.counts()
    return first, second


def test_matcher_killed_while_publishing_delivering_and_scoring(
    world: World, fault_free: tuple[Outcome, Outcome], tmp_path: Path
) -> None:
    first, second = fault_free
    a, _, c = world.counties
    with world.federation(tmp_path / "fed") as local:
        # Phase 1. SIGKILL the matcher once it has stored some batches and not others.
        ingest = threading.Thread(target=local.ingest_all, args=(world.files,))
        ingest.start()
        _wait(lambda: local.status()["tokens"] > 0, "the first stored batch", timeout=60)
        local.kill("matcher")
        ingest.join(TIMEOUT)
        waiting = {county: _outbox_pending(local, county) for county in world.counties}
        assert sum(waiting.values()) > 0
        # The nodes retry against a dead matcher meanwhile; their metrics show the outage.
        county = max(waiting, key=lambda x: waiting[x])
        pending = 'jigsaw_node_outbox_pending{kind="token_batch"}'
        failures = 'jigsaw_node_publish_failures_total{kind="token_batch"}'
        _wait(lambda: _metric(local, failures, county) > 0, "a failed publish to be counted")
        assert _metric(local, pending, county) == waiting[county]
        local.restart("matcher")
        local.wait_for_tokens(sum(world.accepted.values()), TIMEOUT)
        assert _metric(local, pending, county) == 0

        # Freeze one node, link, and SIGKILL the matcher while its delivery to that node is
        # in flight: the frozen node then stores the alerts, but its ack goes nowhere.
        local.pause(c)
        assert local.relink(retrain=True)["status"] == "linked"
        _wait(
            lambda: all(local.node_status(x)["alerts"]["open"] > 0 for x in (a, world.counties[1])),
            "delivery to the other counties",
        )
        time.sleep(1.0)  # the delivery to the frozen node is in its socket by now
        assert local.status()["alerts_pending"] > 0
        local.kill("matcher")
        local.resume(c)
        _wait(lambda: local.node_status(c)["alerts"]["open"] > 0, "the frozen node catching up")
        local.restart("matcher")
        local.wait_until_delivered(TIMEOUT)
        _assert_same(_observe(local, world.accepted), first)

        # Phase 2. SIGKILL the matcher as soon as it has acknowledged the changes (while it
        # scores them or delivers the alerts).
        local.ingest(a, world.changed)
        _wait(lambda: _outbox_pending(local, a) == 0, "the changes to be acknowledged")
        local.kill("matcher")
        local.restart("matcher")
        local.wait_until_delivered(TIMEOUT)
        _assert_same(_observe(local, world.accepted_after), second)


def test_nodes_killed_while_publishing_and_down_while_alerts_queue(
    world: World, fault_free: tuple[Outcome, Outcome], tmp_path: Path
) -> None:
    first, second = fault_free
    a, b, c = world.counties
    with world.federation(tmp_path / "fed") as local:
        # Phase 1. A node is SIGKILLed with a token batch in flight: the matcher is frozen,
        # so it reads and stores the batch only after the node that sent it is gone, and
        # the restarted node sends it again.
        local.pause("matcher")
        local.ingest(a, world.files[0])
        _wait(lambda: _sending(local, a), "the first batch to be sent")
        time.sleep(1.0)  # all of it
        local.kill(a)
        local.resume("matcher")
        local.ingest_all(world.files[1:])
        _wait(lambda: local.status()["counties"].get(a, 0) > 0, "the orphaned batch", timeout=20)
        local.restart(a)
        local.wait_for_tokens(sum(world.accepted.values()), TIMEOUT)
        assert _metric(local, "jigsaw_matcher_duplicate_batches_total") >= 1

        # A node is down while the matcher links: its alerts queue, the others get theirs.
        local.kill(c)
        assert local.relink(retrain=True)["status"] == "linked"
        _wait(lambda: local.status()["metrics"]["delivery_failures"] >= 2, "failed deliveries")
        assert local.status()["alerts_pending"] > 0
        local.restart(c)
        local.wait_until_delivered(TIMEOUT)
        _assert_same(_observe(local, world.accepted), first)

        # Phase 2. The county whose people the changes link to is down meanwhile.
        local.kill(b)
        failures = local.status()["metrics"]["delivery_failures"]
        local.ingest(a, world.changed)
        _wait(
            lambda: local.status()["metrics"]["delivery_failures"] >= failures + 2,
            "failed deliveries",
        )
        local.restart(b)
        local.wait_until_delivered(TIMEOUT)
        _assert_same(_observe(local, world.accepted_after), second)
