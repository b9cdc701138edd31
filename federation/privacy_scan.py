"""Look for plaintext identifiers in files that must hold none (the matcher's store and logs).

Used by ``jigsaw demo`` (reported in ``summary.json``) and by the tests. It searches the raw
bytes, case-insensitively, for names, dates of birth, NHS numbers (with and without spaces)
and postcodes taken from the county exports.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

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


def _found(data: bytes, value: bytes) -> bool:
    """Whether ``value`` occurs in ``data``.

    A value made only of hex digits (an NHS number, a postcode written without its space such
    as "b369ab") also occurs by chance inside the hex pseudonyms and ids the matcher rightly
    stores, so for those only an occurrence that is not part of a longer run of hex digits
    counts.
    """
    if not _hex_like(value):
        return value in data
    start = data.find(value)
    while start != -1:
        before = data[start - 1 : start]
        after = data[start + len(value) : start + len(value) + 1]
        if not (before and _hex_like(before)) and not (after and _hex_like(after)):
            return True
        start = data.find(value, start + 1)
    return False


def scan_for_plaintext(paths: Iterable[Path], values: Sequence[tuple[str, bytes]]) -> ScanReport:
    """Search every file under ``paths`` for any of ``values``."""
    files = [
        p for root in paths for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()
    ]
    found: set[str] = set()
    scanned = 0
    for path in files:
        data = path.read_bytes().lower()
        scanned += len(data)
        for kind, value in values:
            if _found(data, value):
                found.add(f"{kind} in {path.name}")
    return ScanReport(len(files), scanned, len(values), tuple(sorted(found)))
