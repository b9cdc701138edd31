"""``jigsaw demo``: a whole federation on this machine, every party a real HTTP server.

One matcher and one node per county, each a separate process serving HTTP on loopback with its
own DuckDB file and keys (``DIR/matcher/``, ``DIR/nodes/<county>/``). Each node ingests its
county's file and publishes tokens; the matcher links them and delivers alerts; the demo then
reads every inbox back through its node's own API into ``DIR/alerts/<county>.jsonl`` and
writes ``DIR/summary.json``. With ground truth (the generated counties), it also scores the
alerts, and the same files linked offline by ``jigsaw link``'s pipeline, side by side.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pandas as pd

from federation.errors import ConfigError, TransportError
from federation.keys import init_federation, load_secret, secret_path, write_secret
from federation.privacy_scan import identifier_values, scan_for_plaintext
from linkage.evaluate import cluster_pairs, pair_quality, true_household_pairs, true_person_pairs
from linkage.pipeline import Stages, link_files
from linkage.synthetic import generate_federation, write_federation
from linkage.tokenise import TokenSpec

__all__ = ["DemoOptions", "run_demo"]

Say = Callable[[str], None]


@dataclass(frozen=True)
class DemoOptions:
    """What ``jigsaw demo`` runs.

    Attributes:
        out: Output folder (created; a previous demo's output in it is replaced).
        counties_dir: County exports to use; synthetic counties are generated if ``None``.
        counties: Number of synthetic counties.
        records: Approximate total synthetic records.
        seed: Seed for the synthetic data and the tokens' bit flips.
        keep_running: Leave the servers running until interrupted.
        timeout: Seconds to wait for the federation to finish.
    """

    out: Path
    counties_dir: Path | None = None
    counties: int = 6
    records: int = 15_000
    seed: int = 7
    keep_running: bool = False
    timeout: float = 300.0


@dataclass
class _Party:
    name: str
    url: str
    config: Path
    log: Path
    admin_token: str
    process: subprocess.Popen[bytes] | None = None


@dataclass
class _Federation:
    matcher: _Party
    nodes: dict[str, _Party] = field(default_factory=dict)

    def all(self) -> list[_Party]:
        return [self.matcher, *self.nodes.values()]


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports: all held open at once, so none is handed out twice."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / "summary.json").exists() and not (out / "registry.toml").exists():
            raise ConfigError(
                [f"{out} is not empty and is not a previous demo's output; choose another --out"]
            )
        for child in ("matcher", "nodes", "alerts", "secret", "counties"):
            shutil.rmtree(out / child, ignore_errors=True)
        for name in ("registry.toml", "summary.json", "truth.csv", "link"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _county_files(options: DemoOptions, say: Say) -> tuple[list[Path], Path | None]:
    if options.counties_dir is not None:
        files = sorted(
            p for p in options.counties_dir.iterdir() if p.suffix.lower() in (".csv", ".parquet")
        )
        if len(files) < 2:
            raise ConfigError([f"{options.counties_dir} holds fewer than two county files"])
        return files, None
    say(f"Generating {options.counties} synthetic counties (~{options.records:,} records)")
    fed = generate_federation(counties=options.counties, records=options.records, seed=options.seed)
    truth = options.out / "truth.csv"
    files = write_federation(fed, options.out / "counties", truth_path=truth)
    return sorted(files), truth


def _write_toml(path: Path, values: dict[str, Any]) -> None:
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f"{key} = {json.dumps(str(value))}")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)


def _set_up(
    out: Path,
    counties: list[str],
    seeds: dict[str, int],
    matcher_extra: dict[str, Any],
    node_extra: dict[str, Any] | None = None,
) -> _Federation:
    names = ["matcher", *counties]
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    init_federation(
        out,
        node_ids=counties,
        matcher_url=urls["matcher"],
        node_urls={c: urls[c] for c in counties},
    )
    matcher_dir = out / "matcher"
    matcher = _Party(
        "matcher",
        urls["matcher"],
        matcher_dir / "matcher.toml",
        matcher_dir / "matcher.log",
        secrets.token_urlsafe(24),
    )
    _write_toml(
        matcher.config,
        {
            "port": ports["matcher"],
            "data_dir": str(matcher_dir),
            "registry": str(out / "registry.toml"),
            "private_key": str(matcher_dir / "matcher.key"),
            "admin_token": matcher.admin_token,
            "auto_link": False,
            **matcher_extra,
        },
    )
    federation = _Federation(matcher)
    for county in counties:
        node_dir = out / "nodes" / county
        party = _Party(
            county,
            urls[county],
            node_dir / "node.toml",
            node_dir / "node.log",
            secrets.token_urlsafe(24),
        )
        _write_toml(
            party.config,
            {
                "node_id": county,
                "port": ports[county],
                "data_dir": str(node_dir),
                "registry": str(out / "registry.toml"),
                "private_key": str(node_dir / "node.key"),
                "secret": str(secret_path(out)),
                "admin_token": party.admin_token,
                **({"tokenise_seed": seeds[county]} if county in seeds else {}),
                **(node_extra or {}),
            },
        )
        federation.nodes[county] = party
    return federation


def _start(federation: _Federation) -> None:
    for party in federation.all():
        _start_party(party)


def _start_party(party: _Party) -> None:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    role = "matcher" if party.name == "matcher" else "node"
    with open(party.log, "ab") as log:  # the child keeps its own copy of the handle
        party.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "federation.cli",
                role,
                "serve",
                "--config",
                str(party.config),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _stop(federation: _Federation) -> None:
    for party in federation.all():
        if party.process and party.process.poll() is None:
            party.process.send_signal(signal.SIGCONT)  # a paused party could not act on TERM
            party.process.send_signal(signal.SIGTERM)
    for party in federation.all():
        if party.process:
            try:
                party.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                party.process.kill()
                party.process.wait()  # reaped, so its files' locks are gone when _stop returns


def _wait_ready(
    client: httpx.Client, federation: _Federation, timeout: float, only: _Party | None = None
) -> None:
    deadline = time.monotonic() + timeout
    for party in [only] if only is not None else federation.all():
        while True:
            if party.process and party.process.poll() is not None:
                raise TransportError(f"{party.name} exited during start-up; see {party.log}")
            try:
                if client.get(f"{party.url}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TransportError(f"{party.name} did not become ready; see {party.log}")
            time.sleep(0.1)


def _admin(party: _Party) -> dict[str, str]:
    return {"Authorization": f"Bearer {party.admin_token}"}


def _wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TransportError(f"timed out waiting for {what}")
        time.sleep(interval)


class LocalFederation:
    """A matcher and county nodes as separate server processes on loopback (demo and tests).

    Use as a context manager: the servers start on entry and stop on exit.

    Args:
        out: Folder for keys, settings, databases and logs.
        counties: County ids.
        seeds: Per-county seed for the Bloom-filter bit flips (repeatable runs).
        matcher_settings: Extra matcher settings (e.g. ``{"auto_link": True}``).
        node_settings: Extra settings for every node (e.g. ``{"batch_size": 50}``).
        secret: The federation secret to use instead of a fresh one, so that two federations
            given the same secret, seeds and files make the same tokens (fault-injection
            tests compare a faulty run with a fault-free one this way).
    """

    def __init__(
        self,
        out: Path,
        counties: Sequence[str],
        *,
        seeds: dict[str, int] | None = None,
        matcher_settings: dict[str, Any] | None = None,
        node_settings: dict[str, Any] | None = None,
        secret: bytes | None = None,
    ) -> None:
        self.out = out
        self.federation = _set_up(
            out, list(counties), seeds or {}, matcher_settings or {}, node_settings
        )
        if secret is not None:
            write_secret(secret_path(out), secret, overwrite=True)
        self.client = httpx.Client(timeout=httpx.Timeout(300.0, connect=2.0))

    def __enter__(self) -> LocalFederation:
        _start(self.federation)
        try:
            _wait_ready(self.client, self.federation, 60)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every server (SIGTERM, then SIGKILL after 20 s)."""
        self.client.close()
        _stop(self.federation)

    @property
    def matcher(self) -> _Party:
        """The matcher's process, URL and admin token."""
        return self.federation.matcher

    @property
    def nodes(self) -> dict[str, _Party]:
        """County id -> node."""
        return self.federation.nodes

    # ------------------------------------------------------------ fault injection
    def party(self, name: str) -> _Party:
        """The matcher (``"matcher"``) or a county's node."""
        return self.matcher if name == "matcher" else self.nodes[name]

    def kill(self, name: str) -> None:
        """Kill a party's process with SIGKILL (a crash: no shutdown code runs) and reap it."""
        process = self.party(name).process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=20)

    def terminate(self, name: str, timeout: float = 30.0) -> int:
        """Stop a party with SIGTERM (a graceful shutdown) and return its exit code.

        Raises:
            subprocess.TimeoutExpired: If it has not exited within ``timeout`` seconds (it is
                then still running).
        """
        process = self.party(name).process
        if process is None:
            raise TransportError(f"{name} was never started")
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.send_signal(signal.SIGTERM)
        return process.wait(timeout=timeout)

    def pause(self, name: str) -> None:
        """Freeze a party with SIGSTOP: it holds its connections but answers nothing."""
        process = self.party(name).process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        """Let a paused party run again (SIGCONT)."""
        process = self.party(name).process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)

    def restart(self, name: str, timeout: float = 60.0) -> None:
        """Start a stopped or killed party again, with the same settings, port and files, and
        wait until it is ready (a party still running is killed first)."""
        self.kill(name)
        party = self.party(name)
        _start_party(party)
        _wait_ready(self.client, self.federation, timeout, only=party)

    def ingest(self, county: str, path: Path, *, delta: bool = False) -> dict[str, Any]:
        """Have a node ingest a file (it then publishes what changed); ``delta``: the file
        holds only new and changed records."""
        party = self.nodes[county]
        r = self.client.post(
            f"{party.url}/v1/admin/ingest",
            json={"path": str(path), "delta": delta},
            headers=_admin(party),
        )
        if r.status_code != 200:
            raise TransportError(f"{county}: ingest refused ({r.status_code}); see {party.log}")
        return dict(r.json())

    def ingest_all(self, files: Sequence[Path]) -> dict[str, dict[str, Any]]:
        """Every node ingests its county's file, all at once."""
        reports: dict[str, dict[str, Any]] = {}
        errors: list[str] = []

        def run(path: Path) -> None:
            try:
                reports[path.stem] = self.ingest(path.stem, path)
            except (TransportError, httpx.HTTPError) as e:
                errors.append(str(e))

        threads = [threading.Thread(target=run, args=(f,)) for f in files]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise TransportError("; ".join(errors))
        return reports

    def status(self) -> dict[str, Any]:
        """The matcher's admin status (token counts, alerts pending and delivered, model)."""
        r = self.client.get(f"{self.matcher.url}/v1/admin/status", headers=_admin(self.matcher))
        r.raise_for_status()
        return dict(r.json())

    def node_status(self, county: str) -> dict[str, Any]:
        """A node's admin status."""
        party = self.nodes[county]
        r = self.client.get(f"{party.url}/v1/status", headers=_admin(party))
        r.raise_for_status()
        return dict(r.json())

    def wait_for_tokens(self, count: int, timeout: float = 300) -> None:
        """Wait until the matcher holds ``count`` records' tokens and has none queued."""
        _wait_until(
            lambda: (
                ((s := self.status())["tokens"] == count and s["pending"] == 0)
                or (s["tokens"] == count and s["model"] is None)
            ),
            timeout,
            "token batches",
        )

    def wait_until_published(self, timeout: float = 300) -> None:
        """Wait until every node's outbox is empty."""
        _wait_until(
            lambda: all(self.node_status(c)["outbox"]["pending"] == 0 for c in self.nodes),
            timeout,
            "publishing",
        )

    def relink(self, *, retrain: bool = True) -> dict[str, Any]:
        """Ask the matcher to (re)train and link everything it holds."""
        r = self.client.post(
            f"{self.matcher.url}/v1/admin/relink",
            params={"retrain": retrain},
            headers=_admin(self.matcher),
        )
        r.raise_for_status()
        return dict(r.json())

    def wait_until_delivered(self, timeout: float = 300) -> None:
        """Wait until every node has published, and the matcher has scored everything and
        delivered every alert."""
        self.wait_until_published(timeout)
        _wait_until(
            lambda: (s := self.status())["alerts_pending"] == 0 and s["pending"] == 0,
            timeout,
            "alert delivery",
        )

    def alerts(self, county: str, **filters: str) -> list[dict[str, Any]]:
        """A county's alerts, read back through its node's API."""
        party = self.nodes[county]
        r = self.client.get(f"{party.url}/v1/alerts", headers=_admin(party), params=filters)
        r.raise_for_status()
        return list(r.json()["alerts"])


def run_demo(options: DemoOptions, say: Say = print) -> dict[str, Any]:
    """Run the demo federation; returns the summary also written to ``summary.json``."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    out = options.out.resolve()
    options = DemoOptions(**{**options.__dict__, "out": out})
    _prepare_out(out)
    files, truth_path = _county_files(options, say)
    seeds = {f.stem: options.seed + i for i, f in enumerate(files)}
    local = LocalFederation(out, [f.stem for f in files], seeds=seeds)
    users_file = _add_inbox_users(local, out)  # one inbox account per node, for people to use
    say(f"Starting the matcher and {len(files)} county nodes, each its own process on loopback")
    t = time.perf_counter()
    with local:
        timings["start_servers"] = time.perf_counter() - t
        say("Each node ingests its county's file and publishes signed token batches")
        t = time.perf_counter()
        reports = local.ingest_all(files)
        timings["ingest"] = time.perf_counter() - t
        accepted = sum(int(r["accepted"]) for r in reports.values())
        local.wait_for_tokens(accepted, options.timeout)
        timings["ingest_and_publish"] = time.perf_counter() - t

        say("The matcher trains on tokens, links every county and queues alerts")
        t = time.perf_counter()
        link_summary = local.relink(retrain=True)
        timings["train_and_link"] = time.perf_counter() - t

        say("Delivering signed alerts to every county involved")
        t = time.perf_counter()
        local.wait_until_delivered(options.timeout)
        timings["deliver"] = time.perf_counter() - t

        t = time.perf_counter()
        alerts_dir = out / "alerts"
        alerts_dir.mkdir(exist_ok=True)
        inbox: dict[str, list[dict[str, Any]]] = {}
        for county in local.nodes:
            inbox[county] = local.alerts(county)
            with open(alerts_dir / f"{county}.jsonl", "w") as f:
                for alert in inbox[county]:
                    f.write(json.dumps(alert, sort_keys=True) + "\n")
        timings["read_inboxes"] = time.perf_counter() - t
        status = local.status()
        scan = scan_for_plaintext([out / "matcher"], identifier_values(files))
        summary: dict[str, Any] = {
            "matcher": {"url": local.matcher.url, "log": str(local.matcher.log), **link_summary},
            "nodes": {
                county: {
                    "url": party.url,
                    "inbox": f"{party.url}/inbox",
                    "alerts_api": f"{party.url}/v1/alerts",
                    "alerts_file": str(alerts_dir / f"{county}.jsonl"),
                    "log": str(party.log),
                    "ingest": reports[county],
                    "alerts": {
                        "person": sum(a["kind"] == "person" for a in inbox[county]),
                        "family": sum(a["kind"] == "family" for a in inbox[county]),
                    },
                }
                for county, party in local.nodes.items()
            },
            "alerts_delivered": status["alerts_delivered"],
            "alerts_pending": status["alerts_pending"],
            "matcher_plaintext_scan": {
                "files": scan.files,
                "bytes": scan.bytes_scanned,
                "identifiers_checked": scan.values_checked,
                "found": list(scan.found),
            },
        }
        if truth_path is not None:
            t = time.perf_counter()
            summary["quality"] = _quality(files, truth_path, inbox, out, options)
            timings["offline_link_and_score"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - started
        summary["seconds"] = {k: round(v, 2) for k, v in timings.items()}
        (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        if options.keep_running:
            _print_tokens(local.federation, out, say)
            first = next(iter(local.nodes.values()))
            say(
                f"Inboxes: open {first.url}/inbox (and each node's /inbox); sign in as 'lead' "
                f"with the password for that county in {users_file}"
            )
            say("Servers keep running; press Ctrl-C to stop them.")
            try:
                while all(p.process and p.process.poll() is None for p in local.federation.all()):
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return summary


def _print_tokens(federation: _Federation, out: Path, say: Say) -> None:
    lines = [f"{p.name}\t{p.url}\t{p.admin_token}" for p in federation.all()]
    path = out / "admin_tokens.tsv"
    path.write_text("party\turl\tadmin_token\n" + "\n".join(lines) + "\n")
    path.chmod(0o600)
    say(f"Admin tokens for the running servers: {path}")


def _add_inbox_users(local: LocalFederation, out: Path) -> Path:
    """Give each (not yet started) node an inbox user ``lead`` with a random password, and
    write the passwords to the owner-only ``out/inbox_users.tsv``."""
    from federation.node.accounts import add_user_to_database
    from federation.settings import NodeSettings, load_settings

    lines = ["county\tinbox\tusername\tpassword"]
    for county, party in local.nodes.items():
        password = secrets.token_urlsafe(12)
        database = load_settings(NodeSettings, party.config).database
        add_user_to_database(database, "lead", password, replace=True, actor="demo")
        lines.append(f"{county}\t{party.url}/inbox\tlead\t{password}")
    path = out / "inbox_users.tsv"
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _alert_pairs(inbox: dict[str, list[dict[str, Any]]]) -> set[tuple[str, str, str, str]]:
    rows = [
        (a["cluster_id"], county, a["local_record_id"])
        for county, alerts in inbox.items()
        for a in alerts
        if a["kind"] == "person" and a.get("status", "open") != "withdrawn"
    ]
    frame = pd.DataFrame(rows, columns=["cluster_id", "county", "record_id"])
    return cluster_pairs(frame, cluster="cluster_id", county="county", member="record_id")


def _quality(
    files: Sequence[Path],
    truth_path: Path,
    inbox: dict[str, list[dict[str, Any]]],
    out: Path,
    options: DemoOptions,
) -> dict[str, Any]:
    truth = pd.read_csv(truth_path, dtype=str, keep_default_na=False)
    actual = true_person_pairs(truth)
    from_alerts = pair_quality(_alert_pairs(inbox), actual)
    # The same files through jigsaw link's pipeline, with the same secret and seeds.
    tokeniser = TokenSpec().bind(load_secret(secret_path(out)))
    result = link_files(list(files), tokeniser, stages=Stages(), seed=options.seed)
    result.write(out / "link")
    linked = cluster_pairs(
        result.clusters, cluster="cluster_id", county="county", member="record_id"
    )
    offline = pair_quality(linked, actual)
    households = pd.concat(
        [
            pd.read_csv(f, dtype=str, keep_default_na=False)[["record_id", "household_id"]].assign(
                county=f.stem
            )
            for f in files
        ]
    )
    family_truth = true_household_pairs(truth, households)
    family_rows = [
        (a["cluster_id"], county, a["local_household_id"])
        for county, alerts in inbox.items()
        for a in alerts
        if a["kind"] == "family" and a.get("status", "open") != "withdrawn"
    ]
    family_frame = pd.DataFrame(family_rows, columns=["family_id", "county", "household_id"])
    families = pair_quality(
        cluster_pairs(family_frame, cluster="family_id", county="county", member="household_id"),
        family_truth,
    )
    return {
        "person_pairs_from_alerts": from_alerts.as_dict(),
        "person_pairs_from_jigsaw_link": offline.as_dict(),
        "families_from_alerts": families.as_dict(),
    }
