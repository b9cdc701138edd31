"""Reading county exports into the canonical county record shape.

A county export is a CSV or Parquet file with a header row. Every case-management system names
its columns differently, so a :class:`ColumnMapping` (usually loaded from
``configs/mappings/*.toml``) says which export column holds which canonical column.

:func:`read_county_file` only *reads and reshapes*: every value comes back as the exact text of
the export (no type inference, leading zeros kept, missing values as ``""``), under canonical
column names, plus a ``row_number`` column. Interpreting values (dates in the mapping's
``date_format``, the mapping's sex and role codes, names, NHS numbers, postcodes) is the job of
:func:`linkage.normalise.normalise_records`, which turns every problem into a row-level
``RecordIssue`` instead of an exception. The split keeps one place where values are judged, so
a Parquet file and a CSV file holding the same data are reported on identically.

What was noticed while reading (columns ignored or missing, cells that were not valid UTF-8,
rows with the wrong number of fields) is kept in a :class:`ReadReport` attached to the returned
frame; :func:`read_report` fetches it and ``normalise_records`` turns it into issues.
"""

from __future__ import annotations

import csv
import difflib
import io
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv
import pyarrow.parquet as pq

from linkage.errors import InputError, MappingError

__all__ = [
    "CANONICAL_COLUMNS",
    "DEFAULT_DATE_FORMAT",
    "ROW_NUMBER",
    "ColumnMapping",
    "ReadReport",
    "date_pattern",
    "month_number",
    "read_county_file",
    "read_report",
]

CANONICAL_COLUMNS: tuple[str, ...] = (
    "record_id",
    "household_id",
    "role",
    "given_name",
    "middle_names",
    "family_name",
    "previous_family_names",
    "date_of_birth",
    "sex",
    "nhs_number",
    "postcode",
    "address",
)
"""The canonical county record columns in contract order (``schemas/county_record.schema.json``)."""

ROW_NUMBER = "row_number"
"""Column added by :func:`read_county_file`: 1-based data row index (1 = first after the header)."""

DEFAULT_DATE_FORMAT = "%Y-%m-%d"

MAPPING_VERSION = 1
_MAPPING_KEYS = frozenset({"version", "date_format", "columns", "sex_codes", "role_codes"})
_SEX_VALUES = frozenset({"F", "M", "U"})
_ROLE_VALUES = frozenset({"child", "adult", "unknown"})

# The key under which read_county_file leaves its ReadReport in DataFrame.attrs.
_REPORT_ATTR = "jigsaw_read_report"

_UTF8_BOM = b"\xef\xbb\xbf"
# Large enough that one row with a huge free-text field does not straddle pyarrow blocks.
_CSV_BLOCK_SIZE = 16 << 20
_MAX_HEADER_BYTES = 1 << 20


# --------------------------------------------------------------------------------------------
# Column mapping


@dataclass(frozen=True)
class ColumnMapping:
    """How one export shape maps onto the canonical county record.

    Canonical columns not named in ``columns`` are looked up in the export under their own
    name (so a mapping only needs to list the columns that are renamed). Header names are
    matched exactly after trimming spaces, then case-insensitively.

    Attributes:
        columns: Canonical column name -> column name in the export. Must map ``record_id``.
        date_format: Format of ``date_of_birth`` in the export, using only ``%d``, ``%m``,
            ``%Y``, ``%b`` and ``%B`` (English month names, whatever the locale). Two-digit
            years are refused: they are ambiguous for dates of birth. ISO dates are accepted
            as well whatever this says, because Parquet date columns are read as ISO text.
        sex_codes: Export code (matched case-insensitively, spaces trimmed) -> ``"F"``, ``"M"``
            or ``"U"`` (unknown). Consulted before the built-in codes.
        role_codes: Export code -> ``"child"``, ``"adult"`` or ``"unknown"``. Consulted before
            the built-in codes.

    Raises:
        MappingError: On construction, listing every problem found.
    """

    columns: Mapping[str, str]
    date_format: str = DEFAULT_DATE_FORMAT
    sex_codes: Mapping[str, str] = field(default_factory=dict)
    role_codes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = _mapping_problems(
            self.columns, self.date_format, self.sex_codes, self.role_codes
        )
        if problems:
            raise MappingError(_problem_list("invalid column mapping", problems))
        # Freeze the tables and store codes in the form they are looked up in.
        object.__setattr__(
            self, "columns", MappingProxyType({k: v.strip() for k, v in self.columns.items()})
        )
        object.__setattr__(
            self,
            "sex_codes",
            MappingProxyType({_code_key(k): v.upper() for k, v in self.sex_codes.items()}),
        )
        object.__setattr__(
            self,
            "role_codes",
            MappingProxyType({_code_key(k): v.lower() for k, v in self.role_codes.items()}),
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Read-only mapping proxies cannot be pickled; rebuild (and re-validate) from dicts so a
        # mapping can be sent to worker processes.
        tables = (dict(self.columns), self.date_format, dict(self.sex_codes))
        return (type(self), (*tables, dict(self.role_codes)))

    def __deepcopy__(self, memo: dict[int, Any]) -> ColumnMapping:
        return self  # immutable; pandas deep-copies DataFrame.attrs on most operations

    @classmethod
    def from_toml(cls, path: Path) -> ColumnMapping:
        """Load and validate a mapping file such as ``configs/mappings/mosaic_example.toml``.

        Args:
            path: The TOML file. It must hold ``version = 1`` and a ``[columns]`` table; it may
                hold ``date_format`` and ``[sex_codes]`` / ``[role_codes]`` tables.

        Returns:
            The validated mapping.

        Raises:
            MappingError: If the file cannot be read or parsed, or is invalid. The message names
                the file and lists every problem, not just the first.
        """
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise MappingError(f"cannot read column mapping {path}: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise MappingError(f"column mapping {path} is not UTF-8 text") from e
        except tomllib.TOMLDecodeError as e:
            raise MappingError(f"column mapping {path} is not valid TOML: {e}") from e
        except ValueError as e:  # a file name the OS cannot take (a NUL byte, say)
            raise MappingError(f"cannot read column mapping {path}: not a valid file name") from e

        problems: list[str] = []
        version = data.get("version")
        if version is None:
            problems.append(f"'version' is missing (expected version = {MAPPING_VERSION})")
        elif version != MAPPING_VERSION:
            problems.append(
                f"unsupported version {version!r} (this code reads version {MAPPING_VERSION})"
            )
        for key in sorted(set(data) - _MAPPING_KEYS):
            problems.append(f"unknown key {key!r}{_did_you_mean(key, _MAPPING_KEYS)}")

        columns = _string_table(data, "columns", problems, required=True)
        sex_codes = _string_table(data, "sex_codes", problems, required=False)
        role_codes = _string_table(data, "role_codes", problems, required=False)
        date_format = data.get("date_format", DEFAULT_DATE_FORMAT)
        if not isinstance(date_format, str):
            problems.append("'date_format' must be a string")
            date_format = DEFAULT_DATE_FORMAT

        problems.extend(_mapping_problems(columns, date_format, sex_codes, role_codes))
        if problems:
            raise MappingError(_problem_list(f"invalid column mapping {path}", problems))
        return cls(
            columns=columns, date_format=date_format, sex_codes=sex_codes, role_codes=role_codes
        )


def _string_table(
    data: Mapping[str, Any], key: str, problems: list[str], *, required: bool
) -> dict[str, str]:
    """Return ``data[key]`` as a str -> str table, adding a problem for each bad entry."""
    if key not in data:
        if required:
            problems.append(f"[{key}] table is missing")
        return {}
    table = data[key]
    if not isinstance(table, dict):
        problems.append(f"'{key}' must be a table")
        return {}
    out: dict[str, str] = {}
    for name, value in table.items():
        if isinstance(value, str):
            out[name] = value
        else:
            problems.append(f"[{key}] {name!r} must be a string, not {type(value).__name__}")
    return out


def _mapping_problems(
    columns: Mapping[str, str],
    date_format: str,
    sex_codes: Mapping[str, str],
    role_codes: Mapping[str, str],
) -> list[str]:
    """Every problem with a mapping's contents, in a stable order (empty if it is valid)."""
    problems: list[str] = []
    for name in columns:
        if name not in CANONICAL_COLUMNS:
            hint = _did_you_mean(name, CANONICAL_COLUMNS)
            problems.append(f"[columns] {name!r} is not a canonical column{hint}")
    if "record_id" not in columns:
        problems.append("[columns] must map 'record_id'")

    claimed: dict[str, str] = {}
    for name, target in columns.items():
        if not isinstance(target, str) or not target.strip():
            problems.append(f"[columns] {name!r} maps to an empty export column name")
            continue
        # Header matching falls back to case-insensitive, so compare targets the same way.
        key = target.strip().casefold()
        if key in claimed:
            problems.append(
                f"[columns] export column {target.strip()!r} is mapped to both "
                f"{claimed[key]!r} and {name!r}"
            )
        else:
            claimed[key] = name

    try:
        date_pattern(date_format)
    except ValueError as e:
        problems.append(f"date_format {date_format!r}: {e}")

    problems.extend(_code_problems("sex_codes", sex_codes, _SEX_VALUES, str.upper))
    problems.extend(_code_problems("role_codes", role_codes, _ROLE_VALUES, str))
    return problems


def _code_problems(
    table: str, codes: Mapping[str, str], allowed: frozenset[str], fold: Callable[[str], str]
) -> list[str]:
    problems: list[str] = []
    seen: dict[str, tuple[str, str]] = {}
    for code, value in codes.items():
        if not isinstance(code, str):
            problems.append(f"[{table}] code {code!r} must be a string")
            continue
        if not isinstance(value, str) or fold(value) not in allowed:
            problems.append(
                f"[{table}] {code!r} maps to {value!r}; expected one of {sorted(allowed)}"
            )
            continue
        key = _code_key(code)
        if not key:
            problems.append(f"[{table}] has an empty code")
        elif key in seen and fold(seen[key][1]) != fold(value):
            problems.append(
                f"[{table}] codes {seen[key][0]!r} and {code!r} differ only in case or spaces "
                "but map to different values"
            )
        else:
            seen[key] = (code, value)
    return problems


def _code_key(code: str) -> str:
    """The form in which export codes are compared: spaces collapsed, case-folded."""
    return " ".join(code.split()).casefold()


def _did_you_mean(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(name, sorted(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _problem_list(title: str, problems: list[str]) -> str:
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"{title} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n{lines}"


# --------------------------------------------------------------------------------------------
# Date formats

_MONTHS = (
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
)
_DATE_DIRECTIVES = {
    "d": r"(?P<d>[0-9]{1,2})",
    "m": r"(?P<m>[0-9]{1,2})",
    "Y": r"(?P<Y>[0-9]{4})",
    "b": r"(?P<b>[A-Za-z]{3})",
    "B": r"(?P<B>[A-Za-z]{3,9})",
}


@cache
def date_pattern(date_format: str) -> re.Pattern[str]:
    """Compile a ``strptime``-style date format into an anchored regular expression.

    Only ``%d``, ``%m``, ``%Y``, ``%b``, ``%B`` and ``%%`` are supported: that is what dates of
    birth need, and unlike ``strptime`` it does not depend on the process locale. The pattern's
    named groups are ``d``, ``Y`` and one of ``m``/``b``/``B``; month names match
    case-insensitively.

    Args:
        date_format: For example ``"%d/%m/%Y"``.

    Returns:
        The compiled pattern.

    Raises:
        ValueError: If the format uses another directive, or lacks a day, month or year.
    """
    parts: list[str] = []
    used: list[str] = []
    i = 0
    while i < len(date_format):
        char = date_format[i]
        if char != "%":
            parts.append(re.escape(char))
            i += 1
            continue
        directive = date_format[i + 1 : i + 2]
        i += 2
        if directive == "%":
            parts.append("%")
        elif directive == "y":
            raise ValueError("two-digit years (%y) are ambiguous for dates of birth; use %Y")
        elif directive in _DATE_DIRECTIVES:
            if directive in used:
                raise ValueError(f"%{directive} appears more than once")
            used.append(directive)
            parts.append(_DATE_DIRECTIVES[directive])
        else:
            raise ValueError(f"unsupported directive %{directive}; use only %d, %m, %Y, %b and %B")
    months = [d for d in used if d in "mbB"]
    if "d" not in used or "Y" not in used or len(months) != 1:
        raise ValueError("must contain exactly one day (%d), month (%m, %b or %B) and year (%Y)")
    return re.compile("^" + "".join(parts) + "$", re.IGNORECASE)


def month_number(match: re.Match[str]) -> int | None:
    """The month from a :func:`date_pattern` match, or None if a month name is not English."""
    groups = match.groupdict()
    if groups.get("m") is not None:
        return int(groups["m"])
    name = (groups.get("b") or groups.get("B") or "").casefold()
    for number, month in enumerate(_MONTHS, start=1):
        if name == month or (groups.get("b") is not None and name == month[:3]):
            return number
    return None


# --------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class ReadReport:
    """What :func:`read_county_file` noticed about a file, for the caller to report.

    Attributes:
        source: The file's path as given.
        file_format: ``"csv"`` or ``"parquet"``.
        encoding: ``"utf-8"``, or ``"utf-8+cp1252"`` when some cells were not valid UTF-8 and
            were decoded as Windows-1252 instead (listed in ``recoded_cells``).
        extra_columns: Export columns that are not part of the record and were dropped.
        missing_columns: Canonical columns the file lacks; they were added empty.
        recoded_cells: ``(row_number, canonical column)`` of every kept cell decoded as
            Windows-1252. Row 0 is the header.
        malformed_rows: ``(row_number, field_count)`` of every CSV row whose field count differs
            from the header's; such rows are padded or cut to fit and then quarantined by
            ``normalise_records`` because their columns may be misaligned.
        header_fields: Number of fields in the header row.
        mapping: The mapping applied, if any.
    """

    source: str
    file_format: str
    encoding: str
    extra_columns: tuple[str, ...]
    missing_columns: tuple[str, ...]
    recoded_cells: tuple[tuple[int, str], ...]
    malformed_rows: tuple[tuple[int, int], ...]
    header_fields: int
    mapping: ColumnMapping | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible form; :meth:`from_dict` reverses it.

        This is what is stored in ``DataFrame.attrs``: pandas deep-copies attrs on most
        operations and pyarrow writes them as JSON into Parquet metadata.
        """
        mapping = self.mapping
        return {
            "source": self.source,
            "file_format": self.file_format,
            "encoding": self.encoding,
            "extra_columns": list(self.extra_columns),
            "missing_columns": list(self.missing_columns),
            "recoded_cells": [list(cell) for cell in self.recoded_cells],
            "malformed_rows": [list(row) for row in self.malformed_rows],
            "header_fields": self.header_fields,
            "mapping": None
            if mapping is None
            else {
                "columns": dict(mapping.columns),
                "date_format": mapping.date_format,
                "sex_codes": dict(mapping.sex_codes),
                "role_codes": dict(mapping.role_codes),
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReadReport:
        """Rebuild a report from :meth:`to_dict` output."""
        mapping = data["mapping"]
        return cls(
            source=data["source"],
            file_format=data["file_format"],
            encoding=data["encoding"],
            extra_columns=tuple(data["extra_columns"]),
            missing_columns=tuple(data["missing_columns"]),
            recoded_cells=tuple((int(r), str(c)) for r, c in data["recoded_cells"]),
            malformed_rows=tuple((int(r), int(n)) for r, n in data["malformed_rows"]),
            header_fields=int(data["header_fields"]),
            mapping=None if mapping is None else ColumnMapping(**mapping),
        )


def read_report(frame: pd.DataFrame) -> ReadReport | None:
    """The :class:`ReadReport` that :func:`read_county_file` attached to ``frame``, if any.

    Args:
        frame: A frame returned by :func:`read_county_file` (or derived from one).

    Returns:
        The report, or None for frames built some other way.
    """
    data = frame.attrs.get(_REPORT_ATTR)
    return ReadReport.from_dict(data) if isinstance(data, dict) else None


@dataclass
class _Table:
    """A file as read, before mapping: header names and a way to fetch each column as text."""

    header: list[str]
    n_rows: int
    column: Callable[[int], pd.Series]
    recoded: list[tuple[int, int]]  # (row_number, header index); row 0 is the header
    malformed: list[tuple[int, int]]


def read_county_file(path: Path, *, mapping: ColumnMapping | None = None) -> pd.DataFrame:
    """Read a county export (CSV or Parquet) into canonical columns, every value as text.

    CSV files are read as UTF-8 (a byte-order mark is ignored). If some bytes are not valid
    UTF-8, the file is read again as bytes: valid UTF-8 cells are kept as they are and only the
    others are decoded as Windows-1252 (the usual culprit: an export opened and saved in
    Excel); every such cell is listed in the :class:`ReadReport` so that ``normalise_records``
    warns about it. Nothing is replaced silently. Blank lines are skipped and do not count as
    rows; fields may contain quoted newlines. Rows with more or fewer fields than the header
    are padded or cut, kept, and listed in the report (``normalise_records`` quarantines them);
    such files go through the standard-library reader, which is several times slower.

    Parquet columns of any simple type are turned into text: dates as ISO ``YYYY-MM-DD``, whole
    floats without ``.0`` (NHS numbers stored as floats keep their digits), nulls as ``""``.

    Args:
        path: The export; ``.csv`` or ``.parquet`` (case-insensitive).
        mapping: How the export's columns map to canonical ones. Without one, the header is
            expected to use canonical names. The mapping's date format and codes are not applied
            here but by ``normalise_records``, which finds the mapping in the report.

    Returns:
        A frame with ``row_number`` (int, 1 = first data row) followed by
        :data:`CANONICAL_COLUMNS`, all ``str`` with ``""`` for missing values. Canonical columns
        absent from the file are present and empty; extra columns are dropped. A
        :class:`ReadReport` is attached (see :func:`read_report`).

    Raises:
        InputError: If the file is missing or unreadable, is not ``.csv``/``.parquet``, is not
            valid CSV/Parquet, has no header, has no record_id column, or names a column the
            record needs more than once. The message names the file but never quotes its data.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise InputError(
            f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
            "county files must be .csv or .parquet"
        )
    try:
        found = path.is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte: no such file either
        found = False
    if not found:
        raise InputError(f"{path}: county file not found")

    if suffix == ".csv":
        table = _read_csv_fast(path)
        if table is None:
            table = _read_csv_slow(path)
    else:
        table = _read_parquet(path)

    positions, missing, extra = _resolve_columns(table.header, mapping, path)
    data: dict[str, Any] = {ROW_NUMBER: pd.RangeIndex(1, table.n_rows + 1).to_numpy()}
    for name in CANONICAL_COLUMNS:
        if name in positions:
            series = table.column(positions[name])
            data[name] = series.reset_index(drop=True)
        else:
            data[name] = pd.Series([""] * table.n_rows, dtype="str")
    frame = pd.DataFrame(data)

    # Only now is `table.recoded` complete: Parquet columns are converted (and recoded) as they
    # are fetched, so dropped extra columns of awkward types are never touched.
    canonical_at = {index: name for name, index in positions.items()}
    recoded = tuple(
        (row, canonical_at[index]) for row, index in table.recoded if index in canonical_at
    )
    report = ReadReport(
        source=str(path),
        file_format=suffix[1:],
        encoding="utf-8+cp1252" if recoded else "utf-8",
        extra_columns=tuple(extra),
        missing_columns=tuple(missing),
        recoded_cells=recoded,
        malformed_rows=tuple(table.malformed),
        header_fields=len(table.header),
        mapping=mapping,
    )
    frame.attrs[_REPORT_ATTR] = report.to_dict()
    return frame


def _resolve_columns(
    header: list[str], mapping: ColumnMapping | None, path: Path
) -> tuple[dict[str, int], list[str], list[str]]:
    """Find each canonical column's position in ``header``.

    Returns:
        (canonical name -> header index, canonical columns not found, header names not used)
    """
    explicit = dict(mapping.columns) if mapping is not None else {}
    explicit_targets = {t.casefold() for t in explicit.values()}
    stripped = [h.strip() for h in header]
    problems: list[str] = []
    positions: dict[str, int] = {}
    missing: list[str] = []
    for name in CANONICAL_COLUMNS:
        if name in explicit:
            target = explicit[name]
        elif name.casefold() in explicit_targets:
            # Another canonical column is mapped to an export column of this name, so the
            # export's column is not this one.
            missing.append(name)
            continue
        else:
            target = name
        hits = [i for i, h in enumerate(stripped) if h == target]
        if not hits:
            hits = [i for i, h in enumerate(stripped) if h.casefold() == target.casefold()]
        if len(hits) > 1:
            problems.append(f"column {target!r} ({name}) appears {len(hits)} times in the header")
        elif hits:
            positions[name] = hits[0]
        else:
            missing.append(name)
    if "record_id" in missing:
        expected = explicit.get("record_id", "record_id")
        problems.insert(0, f"no record_id column (looked for a column named {expected!r})")
    if problems:
        raise InputError(_problem_list(f"{path}: cannot read county file", problems))
    used = set(positions.values())
    extra = [
        stripped[i] or f"(unnamed column {i + 1})" for i in range(len(header)) if i not in used
    ]
    return positions, missing, extra


def _read_csv_fast(path: Path) -> _Table | None:
    """Read a CSV whose rows all have the header's field count, with pyarrow.

    Values are read as UTF-8 text; if some bytes are not valid UTF-8, the file is read again as
    bytes and only the offending cells are decoded as Windows-1252 (see :func:`_recode_bytes`).

    Returns:
        The table, or None if the file needs the careful reader (a row with the wrong number of
        fields, a header with a quoted newline, an empty file).
    """
    try:
        with path.open("rb") as f:
            first = f.readline(_MAX_HEADER_BYTES)
    except OSError as e:
        raise InputError(f"{path}: cannot read county file ({e.strerror})") from e
    first = first.removeprefix(_UTF8_BOM)
    if not first.strip(b"\r\n") or not first.endswith(b"\n") or first.count(b'"') % 2:
        return None
    recoded: list[tuple[int, int]] = []
    try:
        try:
            header = next(csv.reader([first.decode("utf-8").rstrip("\r\n")]))
        except UnicodeDecodeError:
            # (A csv.Error here, from a stray carriage return, must be caught too.)
            latin = next(csv.reader([first.decode("latin-1").rstrip("\r\n")]))
            header = [_recode(cell, 0, i, recoded) for i, cell in enumerate(latin)]
    except (csv.Error, StopIteration):
        return None

    # Positional names sidestep duplicate or odd header names, which _resolve_columns judges.
    names = [f"c{i}" for i in range(len(header))]
    kinds = [pa.binary()] if recoded else [pa.string(), pa.binary()]
    for kind in kinds:
        try:
            table = pv.read_csv(
                path,
                read_options=pv.ReadOptions(
                    column_names=names, skip_rows=1, block_size=_CSV_BLOCK_SIZE
                ),
                parse_options=pv.ParseOptions(newlines_in_values=True, ignore_empty_lines=True),
                convert_options=pv.ConvertOptions(
                    column_types=dict.fromkeys(names, kind), strings_can_be_null=False
                ),
            )
        except pa.ArrowInvalid:
            # Invalid UTF-8 (try again as bytes) or a row with the wrong number of fields.
            # pyarrow's message quotes the offending row, so it is never passed on.
            continue
        except OSError as e:
            raise InputError(f"{path}: cannot read county file ({e.strerror})") from e
        return _arrow_table(table, header, recoded)
    return None


def _arrow_table(table: pa.Table, header: list[str], recoded: list[tuple[int, int]]) -> _Table:
    def column(index: int) -> pd.Series:
        values = table.column(index)
        if pa.types.is_binary(values.type):
            values = _recode_bytes(values.combine_chunks(), index, recoded)
        return values.to_pandas()

    return _Table(header, table.num_rows, column, recoded=recoded, malformed=[])


def _recode_bytes(values: pa.Array, index: int, recoded: list[tuple[int, int]]) -> pa.Array:
    """Turn a column read as bytes into text, decoding cells that are not UTF-8 as cp1252.

    Only non-ASCII cells are looked at in Python, once per distinct value.
    """
    non_ascii = ~pc.string_is_ascii(values.view(pa.string())).to_numpy(zero_copy_only=False)
    positions = np.flatnonzero(non_ascii)
    replaced: list[bytes] = []
    replaced_at: list[int] = []
    decoded: dict[bytes, bytes | None] = {}
    for position, item in zip(
        positions.tolist(), pc.take(values, pa.array(positions)).to_pylist(), strict=True
    ):
        if item not in decoded:
            try:
                item.decode("utf-8")
                decoded[item] = None
            except UnicodeDecodeError:
                # Five bytes are undefined in cp1252; they become U+FFFD and the cell is reported.
                decoded[item] = item.decode("cp1252", errors="replace").encode("utf-8")
        replacement = decoded[item]
        if replacement is not None:
            replaced.append(replacement)
            replaced_at.append(position)
            recoded.append((position + 1, index))
    if replaced:
        mask = np.zeros(len(values), dtype=bool)
        mask[replaced_at] = True
        values = pc.replace_with_mask(values, pa.array(mask), pa.array(replaced, pa.binary()))
    return pc.cast(values, pa.string())


def _read_csv_slow(path: Path) -> _Table:
    """Read any CSV with the standard library, padding or cutting rows to the header's width.

    Used only when pyarrow refuses the file. If the bytes are not all UTF-8 they are decoded
    as Latin-1, which maps every byte to one character, so the CSV structure (all ASCII)
    parses correctly whatever the encoding; each non-ASCII cell is then turned back into bytes
    and decoded as UTF-8 if it can be, else as Windows-1252.
    """
    try:
        raw = path.read_bytes().removeprefix(_UTF8_BOM)
    except OSError as e:
        raise InputError(f"{path}: cannot read county file ({e.strerror})") from e
    try:
        text, mixed = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        text, mixed = raw.decode("latin-1"), True
    # The csv module refuses fields over 128 KiB by default; the fast reader takes them (a
    # row's over-long values are then dropped with a warning), so this one must too.
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_BLOCK_SIZE))
    reader = csv.reader(io.StringIO(text, newline=""))
    recoded: list[tuple[int, int]] = []
    malformed: list[tuple[int, int]] = []
    try:
        # Blank lines give [] and are skipped, as pyarrow skips them.
        rows = [row for row in reader if row]
    except csv.Error as e:
        # Keep only the line number: never echo file content in an error.
        # The csv module's messages are fixed phrases ("field larger than field limit"), never
        # file content, so they can be passed on.
        raise InputError(f"{path}: not valid CSV near line {reader.line_num}: {e}") from e
    if not rows:
        raise InputError(f"{path}: the file is empty (no header row)")
    header, rows = rows[0], rows[1:]
    if mixed:
        header = [_recode(cell, 0, i, recoded) for i, cell in enumerate(header)]
    width = len(header)
    # Per-row Python work is kept to the rows that need it: this path may see a million rows.
    widths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    for i in np.flatnonzero(widths != width).tolist():
        malformed.append((i + 1, len(rows[i])))
        rows[i] = (rows[i] + [""] * width)[:width]
    if mixed:
        for i, row in enumerate(rows):
            if not "".join(row).isascii():
                rows[i] = [_recode(cell, i + 1, j, recoded) for j, cell in enumerate(row)]

    columns = list(zip(*rows, strict=True)) if rows else [() for _ in range(width)]

    def column(index: int) -> pd.Series:
        return pa.array(columns[index], type=pa.string()).to_pandas()

    return _Table(header, len(rows), column, recoded=recoded, malformed=malformed)


def _recode(cell: str, row: int, index: int, recoded: list[tuple[int, int]]) -> str:
    """Decode a Latin-1-decoded cell properly: as UTF-8 if valid, else as Windows-1252."""
    if cell.isascii():
        return cell
    data = cell.encode("latin-1")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        recoded.append((row, index))
        return data.decode("cp1252", errors="replace")


def _read_parquet(path: Path) -> _Table:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet file") from e
    recoded: list[tuple[int, int]] = []

    def column(index: int) -> pd.Series:
        return _arrow_text(table.column(index), index, recoded, path, table.schema.names[index])

    return _Table(list(table.schema.names), table.num_rows, column, recoded, malformed=[])


def _arrow_text(
    col: pa.ChunkedArray, index: int, recoded: list[tuple[int, int]], path: Path, name: str
) -> pd.Series:
    """One Parquet column as text (see read_county_file for the rules)."""
    kind = col.type
    if pa.types.is_dictionary(kind):
        col = pc.cast(col, kind.value_type)
        kind = col.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        decoded: dict[bytes, tuple[str, bool]] = {}
        values: list[str] = []
        for number, item in enumerate(col.to_pylist(), start=1):
            if item is None:
                values.append("")
                continue
            if item not in decoded:
                try:
                    decoded[item] = (item.decode("utf-8"), False)
                except UnicodeDecodeError:
                    decoded[item] = (item.decode("cp1252", errors="replace"), True)
            value, was_recoded = decoded[item]
            if was_recoded:
                recoded.append((number, index))
            values.append(value)
        return pd.Series(values, dtype="str")
    if pa.types.is_floating(kind):
        # Whole numbers stored as floats (a pandas int column with gaps) keep their digits.
        valid = pc.drop_null(col)
        if len(valid) == 0 or pc.all(pc.equal(pc.floor(valid), valid)).as_py():
            col = pc.cast(col, pa.int64(), safe=False)
    try:
        text = pc.cast(col, pa.string())
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid) as e:
        raise InputError(
            f"{path}: column {name!r} has type {kind} which cannot be read as text"
        ) from e
    return pc.fill_null(text, "").to_pandas()
