"""The ``jigsaw`` command line.

Commands are thin: they parse options, call the linkage core or the federation services, and
report. Contracts that outside tools rely on (``link``, ``demo``) are described in DESIGN.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from linkage.engine import SplinkEngine
from linkage.errors import LinkageError
from linkage.model import LinkageModel, TrainingOptions
from linkage.pipeline import Stages, link_files
from linkage.records import ColumnMapping
from linkage.tokenise import TokenSpec

app = typer.Typer(
    name="jigsaw",
    help="Jigsaw: federated, privacy-preserving record linkage for child safeguarding.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)

_STAGE_TEXT = {
    "read": "Reading county exports",
    "normalise": "Validating and normalising",
    "tokenise": "Tokenising (keyed tokens and hardened Bloom filters)",
    "register": "Loading tokens into the matcher engine",
    "train": "Training the model on tokens (u by sampling, m by EM)",
    "predict": "Scoring candidate pairs",
    "calibrate": "Calibrating the prior and alert threshold",
    "select": "Selecting pairs above the threshold",
    "cluster": "Clustering people and families",
    "write": "Re-identifying locally and writing results",
}


def _progress_hook() -> tuple[Stages, object]:
    status = console.status("Starting", spinner="dots")

    def hook(stage: str, seconds: float | None) -> None:
        if seconds is None:
            status.update(_STAGE_TEXT.get(stage, stage) + " ...")
        elif seconds > 0.5:
            console.log(f"{_STAGE_TEXT.get(stage, stage)}: {seconds:.1f} s")

    return Stages(hook), status


def _input_files(inputs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in (".csv", ".parquet"))
        else:
            files.append(item)
    return files


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


@app.command()
def link(
    inputs: Annotated[
        list[Path], typer.Argument(help="County exports (CSV or Parquet) or folders of them.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the result files.")],
    mapping: Annotated[
        list[str] | None,
        typer.Option(help="COUNTY=MAPPING.toml for an export in another shape; repeatable."),
    ] = None,
    token_spec: Annotated[
        Path | None, typer.Option(help="Token spec TOML (default: the built-in spec).")
    ] = None,
    secret_file: Annotated[
        Path | None,
        typer.Option(help="Federation secret; a random one-off secret is used if omitted."),
    ] = None,
    model: Annotated[
        Path | None, typer.Option(help="A trained model JSON; trained by EM if omitted.")
    ] = None,
    save_model: Annotated[
        Path | None, typer.Option(help="Write the trained, calibrated model here.")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Alert threshold (default: the model's calibrated one).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for repeatable runs.")] = None,
    engine: Annotated[
        str, typer.Option(help="Where Splink runs: duckdb (embedded) or spark.")
    ] = "duckdb",
    spark_master: Annotated[
        str, typer.Option(help="Spark master URL with --engine spark.")
    ] = "local[2]",
) -> None:
    """Link county exports offline: tokenise each as its node would, match on tokens only.

    Writes pairs.csv, clusters.csv, families.csv and quarantine.csv to --out.
    """
    logging.basicConfig(level=logging.WARNING)
    files = _input_files(inputs)
    if len(files) < 2:
        _fail("give at least two county files (one county per file)")
    counties = [f.stem for f in files]
    if len(set(counties)) != len(counties):
        _fail("two input files have the same county id (file stem)")
    try:
        mappings = {}
        for item in mapping or []:
            county, _, path = item.partition("=")
            if not path:
                _fail(f"--mapping expects COUNTY=FILE, got {item!r}")
            mappings[county] = ColumnMapping.from_toml(Path(path))
        spec = TokenSpec.from_toml(token_spec) if token_spec else TokenSpec()
        secret = _read_secret(secret_file) if secret_file else os.urandom(32)
        tokeniser = spec.bind(secret)
        loaded = LinkageModel.load(model) if model else None
        if loaded is not None and threshold is not None:
            loaded.threshold = threshold
        if engine not in ("duckdb", "spark"):
            _fail(f"--engine must be duckdb or spark, not {engine!r}")
        stages, status = _progress_hook()
        with status, _link_engine(engine, spark_master) as splink_engine:  # type: ignore[attr-defined]
            result = link_files(
                files,
                tokeniser,
                mappings=mappings,
                model=loaded,
                engine=splink_engine,
                stages=stages,
                training=TrainingOptions(seed=seed if seed is not None else 42),
                seed=seed,
            )
    except LinkageError as e:
        _fail(str(e))
        return
    if threshold is not None and loaded is None:
        console.print("[yellow]note:[/] --threshold applies to a loaded --model only")
    result.write(out)
    if save_model:
        result.match.model.save(save_model)
    _summary(result, out)


@contextlib.contextmanager
def _link_engine(engine: str, spark_master: str) -> Iterator[SplinkEngine | None]:
    """The Splink engine of ``jigsaw link`` (``None``: the pipeline's in-memory DuckDB)."""
    if engine == "duckdb":
        yield None
        return
    with SplinkEngine("spark", spark_master=spark_master) as spark:
        yield spark


def _read_secret(path: Path) -> bytes:
    """The federation secret as every node reads it (base64 or hex text in an owner-only file)."""
    from federation.errors import ConfigError
    from federation.keys import load_secret

    try:
        return load_secret(path)
    except ConfigError as e:
        _fail(str(e))
        raise  # unreachable: _fail exits


def _summary(result: object, out: Path) -> None:
    from linkage.pipeline import LinkResult

    assert isinstance(result, LinkResult)
    table = Table(title="jigsaw link")
    for col in ("county", "rows", "accepted", "quarantined", "warnings"):
        table.add_column(col, justify="right" if col != "county" else "left")
    for county, c in result.counts.items():
        table.add_row(
            county,
            str(c["input_rows"]),
            str(c["accepted"]),
            str(c["quarantined"]),
            str(c["warnings"]),
        )
    console.print(table)
    m = result.match
    console.print(
        f"{m.candidate_pairs:,} candidate pairs scored; threshold "
        f"{m.model.threshold:.2f} (calibrated prior {m.model.prior:.3g})\n"
        f"{len(result.pairs):,} linked pairs, "
        f"{result.clusters['cluster_id'].nunique():,} people known to 2+ counties, "
        f"{result.families['family_id'].nunique():,} families across counties\n"
        f"Results in {out}/ (pairs.csv, clusters.csv, families.csv, quarantine.csv); "
        f"total {sum(result.seconds.values()):.1f} s"
    )
    (out / "summary.json").write_text(
        json.dumps(
            {
                "counts": result.counts,
                "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
                "threshold": m.model.threshold,
                "candidate_pairs": m.candidate_pairs,
                "pairs": len(result.pairs),
            },
            indent=2,
        )
    )


keys_app = typer.Typer(help="Create, list and rotate federation keys.", no_args_is_help=True)
node_app = typer.Typer(help="Run a county node.", no_args_is_help=True)
matcher_app = typer.Typer(help="Run the central matcher.", no_args_is_help=True)
audit_app = typer.Typer(help="Check tamper-evident audit logs.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(node_app, name="node")
app.add_typer(matcher_app, name="matcher")
app.add_typer(audit_app, name="audit")

ConfigOption = Annotated[Path, typer.Option("--config", help="Settings TOML file.")]


@keys_app.command("init")
def keys_init(
    directory: Annotated[Path, typer.Argument(help="Folder for the new federation's keys.")],
    node: Annotated[list[str], typer.Option(help="County id; repeat for each county.")],
    matcher_url: Annotated[str, typer.Option(help="Base URL of the matcher.")],
    node_url: Annotated[
        list[str] | None, typer.Option(help="COUNTY=URL of a node; repeatable.")
    ] = None,
) -> None:
    """Create the federation secret, every party's signing keys and the registry."""
    from federation.errors import FederationError
    from federation.keys import init_federation

    urls = dict(item.split("=", 1) for item in node_url or [])
    missing = [n for n in node if n not in urls]
    if missing:
        _fail(f"--node-url missing for: {', '.join(missing)}")
    try:
        registry = init_federation(
            directory, node_ids=node, matcher_url=matcher_url, node_urls=urls
        )
    except FederationError as e:
        _fail(str(e))
        return
    console.print(
        f"Created {registry}. Give secret/federation.key to the nodes only; never to the matcher."
    )


@keys_app.command("list")
def keys_list(directory: Annotated[Path, typer.Argument(help="Federation key folder.")]) -> None:
    """List the keys in a federation folder by fingerprint, and the secret's key epochs
    (never the secret)."""
    from federation.errors import FederationError
    from federation.keys import list_keys

    try:
        keys = list_keys(directory)
    except FederationError as e:
        _fail(str(e))
        return
    current = max((k.epoch for k in keys if k.epoch is not None), default=None)
    table = Table(title=str(directory))
    for col in ("id", "role", "epoch", "fingerprint", "path"):
        table.add_column(col)
    for info in keys:
        epoch = ""
        if info.epoch is not None:
            epoch = f"{info.epoch} (current)" if info.epoch == current else str(info.epoch)
        table.add_row(info.id, info.role, epoch, info.fingerprint, str(info.path))
    console.print(table)


@keys_app.command("rotate")
def keys_rotate(
    directory: Annotated[Path, typer.Argument(help="Federation key folder.")],
) -> None:
    """Open a new key epoch: write a fresh federation secret beside the current one.

    The old secret is kept until the matcher has switched to the new epoch (every node has
    re-tokenised under it); then delete it with `jigsaw keys retire`.
    """
    from federation.errors import FederationError
    from federation.keys import keys_audit_path, rotate_secret

    try:
        epoch, path = rotate_secret(directory)
    except FederationError as e:
        _fail(str(e))
        return
    console.print(
        f"Created {path} (key epoch {epoch}); recorded in {keys_audit_path(directory)}.\n"
        f"Give it to every node, never to the matcher. Each node switches when it is started "
        f"with `secret` pointing at it: it re-tokenises its records and publishes them under "
        f"epoch {epoch}. The matcher links on epoch {epoch - 1} until every node has, then "
        f"switches and deletes the old tokens (its /v1/admin/status shows key_epoch). Then run "
        f"`jigsaw keys retire {directory} --epoch {epoch - 1}`."
    )


@keys_app.command("retire")
def keys_retire(
    directory: Annotated[Path, typer.Argument(help="Federation key folder.")],
    epoch: Annotated[int, typer.Option(help="The old key epoch whose secret to delete.")],
) -> None:
    """Delete an old key epoch's secret once the matcher has switched past it."""
    from federation.errors import FederationError
    from federation.keys import retire_secret

    try:
        path = retire_secret(directory, epoch)
    except FederationError as e:
        _fail(str(e))
        return
    console.print(f"Deleted {path} (key epoch {epoch}). Delete the nodes' copies of it too.")


@node_app.command("serve")
def node_serve(config: ConfigOption) -> None:
    """Serve a county node (its API, inbox and publisher) until interrupted."""
    from federation.node.app import run as run_node
    from federation.settings import NodeSettings, load_settings

    _owner_only_files()
    run_node(_settings(lambda: load_settings(NodeSettings, config)))


@node_app.command("ingest")
def node_ingest(
    file: Annotated[Path, typer.Argument(help="The county export (CSV or Parquet).")],
    config: ConfigOption,
    mapping_file: Annotated[
        Path | None, typer.Option("--mapping", help="Column mapping for another export shape.")
    ] = None,
    delta: Annotated[
        bool,
        typer.Option(
            "--delta",
            help="The file holds only new and changed records: keep the records it omits "
            "(by default a record missing from the export is withdrawn).",
        ),
    ] = False,
) -> None:
    """Load an export into a running node, which then publishes what changed."""
    import httpx

    from federation.settings import NodeSettings, load_settings

    settings = _settings(lambda: load_settings(NodeSettings, config))
    url = f"{settings.scheme}://{settings.host}:{settings.port}/v1/admin/ingest"
    body: dict[str, Any] = {"path": str(file.resolve()), "delta": delta}
    if mapping_file:
        body["mapping"] = str(mapping_file.resolve())
    try:
        r = httpx.post(
            url,
            json=body,
            headers={"Authorization": f"Bearer {settings.admin_token}"},
            timeout=600,
        )
    except httpx.HTTPError as e:
        _fail(f"the node at {url} is not reachable ({e}); start it with `jigsaw node serve`")
        return
    if r.status_code != 200:
        _fail(f"ingest refused ({r.status_code}): {r.json().get('detail', '')}")
    console.print_json(data=r.json())


@node_app.command("publish")
def node_publish(config: ConfigOption) -> None:
    """Send a stopped node's pending token batches and feedback to the matcher now."""
    from federation.node.publisher import publish_pending
    from federation.settings import NodeSettings, load_settings

    settings = _settings(lambda: load_settings(NodeSettings, config))
    sent = publish_pending(settings)
    console.print(f"{sent} messages acknowledged by the matcher")


@node_app.command("user-add")
def node_user_add(
    username: Annotated[str, typer.Argument(help="Name: lower-case letters, digits, . _ -")],
    config: ConfigOption,
    password_file: Annotated[
        Path | None,
        typer.Option("--password-file", help="Read the password from this file's first line."),
    ] = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="Set a new password for an existing user.")
    ] = False,
) -> None:
    """Add a safeguarding lead's inbox account, or reset its password with --replace.

    Opens a stopped node's store directly; while the node runs (and holds its store), asks it
    through its admin API instead. The password comes from a prompt unless --password-file.
    """
    import httpx

    from federation.errors import StoreError
    from federation.node.accounts import AccountError, add_user_to_database, check_new_password
    from federation.node.notify import inbox_url
    from federation.settings import NodeSettings, load_settings

    settings = _settings(lambda: load_settings(NodeSettings, config))
    if password_file is not None:
        try:
            password = (password_file.read_text(encoding="utf-8").splitlines() or [""])[0]
        except (OSError, UnicodeDecodeError):
            _fail(f"cannot read the password file {password_file}")
            return
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        check_new_password(username, password)
        outcome = add_user_to_database(settings.database, username, password, replace=replace)
    except AccountError as e:
        _fail(str(e))
        return
    except StoreError:  # the running node holds the store: ask it
        url = f"{settings.scheme}://{settings.host}:{settings.port}/v1/admin/users"
        body = {"username": username, "password": password, "replace": replace}
        try:
            r = httpx.post(
                url, json=body, headers={"Authorization": f"Bearer {settings.admin_token}"}
            )
        except httpx.HTTPError:
            _fail(f"cannot open {settings.database}, and no node answers at {url}")
            return
        if r.status_code != 201:
            _fail(f"refused ({r.status_code}): {r.json().get('detail', '')}")
        outcome = r.json()["status"]
    console.print(f"User {username} {outcome}. Sign in at {inbox_url(settings)}")


@matcher_app.command("serve")
def matcher_serve(config: ConfigOption) -> None:
    """Serve the matcher until interrupted."""
    from federation.matcher.app import run as run_matcher
    from federation.settings import MatcherSettings, load_settings

    _owner_only_files()
    run_matcher(_settings(lambda: load_settings(MatcherSettings, config)))


@matcher_app.command("retrain")
def matcher_retrain(
    config: ConfigOption,
    relink_only: Annotated[
        bool, typer.Option(help="Relink with the current model instead of retraining.")
    ] = False,
) -> None:
    """Re-estimate the model from every stored token and relink (on a running matcher)."""
    import httpx

    from federation.settings import MatcherSettings, load_settings

    settings = _settings(lambda: load_settings(MatcherSettings, config))
    url = f"{settings.scheme}://{settings.host}:{settings.port}/v1/admin/relink"
    try:
        r = httpx.post(
            url,
            params={"retrain": not relink_only},
            headers={"Authorization": f"Bearer {settings.admin_token}"},
            timeout=3600,
        )
    except httpx.HTTPError as e:
        _fail(f"the matcher at {url} is not reachable ({e})")
        return
    if r.status_code != 200:
        _fail(f"refused ({r.status_code})")
    console.print_json(data=r.json())


@audit_app.command("verify")
def audit_verify(
    database: Annotated[Path, typer.Argument(help="A node's or the matcher's DuckDB file.")],
) -> None:
    """Check a stopped service's audit log for edited, removed or reordered entries."""
    from federation.audit import verify_audit_file
    from federation.errors import StoreError

    try:
        report = verify_audit_file(database)
    except StoreError as e:  # no such file, not a DuckDB file, no audit log in it
        _fail(str(e))
        return
    for problem in report.problems:
        console.print(f"[red]{problem}[/]")
    console.print(f"{report.entries} entries; {'intact' if report.ok else 'TAMPERED'}")
    if not report.ok:
        raise typer.Exit(code=1)


@app.command()
def demo(
    counties: Annotated[
        Path | None, typer.Option(help="Folder of county exports (default: generate them).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("demo-out"),
    keep_running: Annotated[
        bool, typer.Option(help="Leave the servers running for you to explore.")
    ] = False,
    records: Annotated[int, typer.Option(help="Synthetic records in all.")] = 15_000,
    n_counties: Annotated[int, typer.Option("--n-counties", help="Synthetic counties.")] = 6,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic data.")] = 7,
) -> None:
    """Run a whole federation on this machine: a matcher and a node per county, over HTTP."""
    from federation.demo import DemoOptions, run_demo
    from federation.errors import FederationError

    logging.basicConfig(level=logging.WARNING)
    options = DemoOptions(
        out=out,
        counties_dir=counties,
        counties=n_counties,
        records=records,
        seed=seed,
        keep_running=keep_running,
    )
    try:
        summary = run_demo(options, say=lambda text: console.print(f"[bold cyan]>[/] {text}"))
    except (FederationError, LinkageError) as e:
        _fail(str(e))
        return
    _demo_report(summary, out)


def _demo_report(summary: dict[str, Any], out: Path) -> None:
    table = Table(title=f"Jigsaw demo federation ({out})")
    for col in ("county", "records", "person alerts", "family alerts"):
        table.add_column(col, justify="left" if col == "county" else "right")
    for county, info in summary["nodes"].items():
        table.add_row(
            county,
            f"{info['ingest']['accepted']:,}",
            f"{info['alerts']['person']:,}",
            f"{info['alerts']['family']:,}",
        )
    console.print(table)
    quality = summary.get("quality")
    if isinstance(quality, dict):
        a = quality["person_pairs_from_alerts"]
        b = quality["person_pairs_from_jigsaw_link"]
        f = quality["families_from_alerts"]
        console.print(
            f"Person links from the alerts: precision {a['precision']:.4f}, recall "
            f"{a['recall']:.4f}, F1 {a['f1']:.4f} "
            f"(jigsaw link on the same files: F1 {b['f1']:.4f}); "
            f"families: F1 {f['f1']:.4f}"
        )
    scan = summary["matcher_plaintext_scan"]
    pending = summary["alerts_pending"]
    console.print(
        f"{summary['alerts_delivered']:,} signed alert messages delivered"
        + (f", [red]{pending:,} still pending[/]" if pending else ", none pending")
        + "; the matcher's files hold "
        + (
            "[red]plaintext: " + ", ".join(scan["found"]) + "[/]"
            if scan["found"]
            else f"none of {scan['identifiers_checked']:,} identifiers sampled from the exports"
        )
        + f". Took {summary['seconds']['total']:.1f} s."
    )
    console.print(
        f"Look in {out}: summary.json (all of the above), alerts/<county>.jsonl (each county's "
        "alerts as its node's API returned them, re-identified with its own records only), "
        "link/ (the same files through jigsaw link), matcher/matcher.log and "
        "nodes/<county>/node.log. Run jigsaw demo --keep-running to open the inboxes in a browser."
    )


def _owner_only_files() -> None:
    """Create every file of a serving process readable by its own user only.

    A node's database holds the county's records in plaintext, and the matcher's every
    county's tokens; DuckDB creates the database, its WAL and spill files with the process's
    umask, commonly 022 (readable by every local user).
    """
    os.umask(0o077)


def _settings(load: object) -> Any:
    from federation.errors import ConfigError

    assert callable(load)
    try:
        return load()
    except ConfigError as e:
        _fail(str(e))


def main() -> None:
    """Entry point for ``python -m federation.cli``."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
