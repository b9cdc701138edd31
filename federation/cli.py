"""The ``jigsaw`` command line.

Commands are thin: they parse options, call the linkage core or the federation services, and
report. Contracts that outside tools rely on (``link``, ``demo``) are described in DESIGN.md.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

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
    "tokenise": "Validating, normalising and tokenising",
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
            files += sorted(
                p for p in item.iterdir() if p.suffix.lower() in (".csv", ".parquet")
            )
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
        secret = secret_file.read_bytes().strip() if secret_file else os.urandom(32)
        tokeniser = spec.bind(secret)
        loaded = LinkageModel.load(model) if model else None
        if loaded is not None and threshold is not None:
            loaded.threshold = threshold
        stages, status = _progress_hook()
        with status:  # type: ignore[attr-defined]
            result = link_files(
                files,
                tokeniser,
                mappings=mappings,
                model=loaded,
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


def main() -> None:
    """Entry point for ``python -m federation.cli``."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
