"""Look for plaintext identifiers in files that must hold none (the matcher's store and logs).

Used by ``jigsaw demo`` (reported in ``summary.json``) and by the tests. It searches,
case-insensitively, for names, dates of birth, NHS numbers (with and without spaces) and
postcodes taken from the county exports:

* in a DuckDB database, every value of every table, read back through DuckDB from a copy of
  the file (and its WAL). DuckDB compresses strings, so the raw bytes would both hide a
  stored name and show chance ones: the symbol tables of its FSST compression splice pieces
  of county names and JSON keys into words such as "foster";
* in any other file (logs, WAL, spill files), the raw bytes.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import ahocorasick
import duckdb
import pandas as pd

__all__ = ["ScanReport", "identifier_values", "scan_for_plaintext"]

_NAME_COLUMNS = ("given_name", "middle_names", "family_name", "previous_family_names")


@dataclass(frozen=True)
class ScanReport:
    """What a scan looked for and found (``found`` names the kind, never the value)."""

    files: int
    bytes_scanned: int
    values_checked: int
    found: tuple[str, ...]

    @property
    def clean(self) -> bool:
        """True when no identifier was found."""
        return not self.found


def identifier_values(
    exports: Sequence[Path], *, sample: int = 400, seed: int = 0
) -> list[tuple[str, bytes]]:
    """``(kind, lower-case bytes)`` identifiers from a sample of each export's rows."""
    rng = random.Random(seed)
    values: set[tuple[str, bytes]] = set()
    for path in exports:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        rows = frame.sample(n=min(sample, len(frame)), random_state=rng.randint(0, 2**31))
        for col in _NAME_COLUMNS:
            if col in rows:
                for cell in rows[col]:
                    for part in cell.replace(";", " ").replace("-", " ").split():
                        # Six letters or more: shorter words turn up by chance in binary data.
                        if len(part) >= 6:
                            values.add(("name", part.lower().encode()))
        for col, kind in (("date_of_birth", "date of birth"), ("postcode", "postcode")):
            if col in rows:
                values.update((kind, v.strip().lower().encode()) for v in rows[col] if len(v) >= 6)
        if "nhs_number" in rows:
            for v in rows["nhs_number"]:
                digits = "".join(ch for ch in v if ch.isdigit())
                if len(digits) == 10:
                    values.add(("NHS number", digits.encode()))
                    values.add(("NHS number", f"{digits[:3]} {digits[3:6]} {digits[6:]}".encode()))
    return sorted(values)


def _hex_like(value: bytes) -> bool:
    return all(ch in b"0123456789abcdef" for ch in value)


def _automaton(values: Sequence[tuple[str, bytes]]) -> ahocorasick.Automaton:
    """One Aho-Corasick automaton for every value: a single pass over each file finds them
    all (searching for each of thousands of values in turn took most of a demo's minute)."""
    automaton = ahocorasick.Automaton()
    for kind, value in values:
        # Bytes go in as latin-1 text: one character per byte, so offsets are byte offsets.
        automaton.add_word(value.decode("latin-1"), (kind, len(value), _hex_like(value)))
    automaton.make_automaton()
    return automaton


def _kinds_found(data: bytes, automaton: ahocorasick.Automaton) -> set[str]:
    """The kinds of value that occur in ``data``.

    A value made only of hex digits (an NHS number, a postcode written without its space such
    as "b369ab") also occurs by chance inside the hex pseudonyms and ids the matcher rightly
    stores, so for those only an occurrence that is not part of a longer run of hex digits
    counts.
    """
    found: set[str] = set()
    for end, (kind, length, hex_like) in automaton.iter(data.decode("latin-1")):
        if kind in found:
            continue
        if hex_like:
            start = end - length + 1
            before = data[start - 1 : start]
            after = data[end + 1 : end + 2]
            if (before and _hex_like(before)) or (after and _hex_like(after)):
                continue
        found.add(kind)
    return found


def scan_for_plaintext(paths: Iterable[Path], values: Sequence[tuple[str, bytes]]) -> ScanReport:
    """Search every file under ``paths`` for any of ``values``.

    Raises:
        duckdb.Error: A DuckDB database could not be read back.
    """
    files = sorted(
        p for root in paths for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()
    )
    found: set[str] = set()
    scanned = 0
    automaton = _automaton(values) if values else None
    for path in files:
        data = (_database_text(path) if _is_duckdb(path) else path.read_bytes()).lower()
        scanned += len(data)
        if automaton is not None:
            found.update(f"{kind} in {path.name}" for kind in _kinds_found(data, automaton))
    return ScanReport(len(files), scanned, len(values), tuple(sorted(found)))


def _is_duckdb(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(12)[8:12] == b"DUCK"  # a DuckDB database's magic bytes


def _database_text(path: Path) -> bytes:
    """Every value of every table in a DuckDB database, as text, one row per line.

    The file is copied first (with its WAL, which opening the copy replays): a running
    service holds its database locked.
    """
    with tempfile.TemporaryDirectory(prefix="jigsaw-scan-") as tmp:
        copy = Path(tmp) / "scan.duckdb"
        shutil.copyfile(path, copy)
        wal = path.with_name(path.name + ".wal")
        if wal.exists():
            shutil.copyfile(wal, copy.with_name(copy.name + ".wal"))
        parts: list[bytes] = []
        with duckdb.connect(str(copy)) as con:
            tables = con.execute(
                "SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = 'scan'"
            ).fetchall()
            for schema, table in tables:
                name = f'"{schema}"."{table}"'
                columns = [r[0] for r in con.execute(f"DESCRIBE {name}").fetchall()]
                text = " || chr(31) || ".join(
                    f"coalesce(CAST(\"{c}\" AS VARCHAR), '')" for c in columns
                )
                rows = con.execute(f"SELECT string_agg({text}, chr(10)) FROM {name}").fetchall()
                parts.append((rows[0][0] or "").encode("utf-8"))
    return b"\n".join(parts)
