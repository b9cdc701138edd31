"""Validating and normalising county records before they are tokenised.

:func:`normalise_records` takes the text frame that :func:`linkage.records.read_county_file`
returns and gives back the rows that can be linked, with every value in one canonical form, and
a :class:`RecordIssue` for every problem found. One bad value never stops a file:

* a bad *value* (impossible date, NHS number failing its check digit, invalid postcode, unknown
  sex or role code, absurdly long field) becomes ``None`` and a ``"warning"`` issue;
* a row that cannot be linked at all (empty or duplicate ``record_id``, no name and no date of
  birth, a CSV row whose fields do not line up with the header) is left out and gets exactly one
  ``"quarantine"`` issue, so ``len(raw) == len(records) + len(quarantined)`` always holds
  (design invariant 4: nothing is lost silently).

Issue reasons name the row and the column, never the value: they end up in logs, in
``quarantine.csv`` and in front of people who may not be entitled to see the record.

Speed: every column is processed as a whole. Text-heavy rules run once per *distinct* value
(``pandas.factorize`` then a lookup), because names, dates and postcodes repeat far more than
rows do; NHS numbers, addresses and record ids, which barely repeat, use pyarrow string kernels
and numpy instead. A million rows take a few seconds.
"""

from __future__ import annotations

import csv
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from functools import cache
from importlib import resources
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from linkage.errors import InputError, LinkageError
from linkage.records import (
    CANONICAL_COLUMNS,
    DEFAULT_DATE_FORMAT,
    ROW_NUMBER,
    ColumnMapping,
    ReadReport,
    _code_key,
    date_pattern,
    month_number,
    read_report,
)

__all__ = [
    "EARLIEST_DATE_OF_BIRTH",
    "ID_MAX_LENGTH",
    "NAME_MAX_LENGTH",
    "OUTPUT_COLUMNS",
    "TEXT_MAX_LENGTH",
    "NormalisedRecords",
    "RecordIssue",
    "canonical_given_name",
    "nhs_number_is_valid",
    "nicknames",
    "normalise_name",
    "normalise_postcode",
    "normalise_records",
]

OUTPUT_COLUMNS: tuple[str, ...] = (
    "row_number",
    "record_id",
    "household_id",
    "role",
    "given_name",
    "given_canonical",
    "middle_names",
    "family_name",
    "previous_family_names",
    "date_of_birth",
    "sex",
    "nhs_number",
    "postcode",
    "postcode_district",
    "postcode_sector",
    "address",
    "display_given_name",
    "display_family_name",
)
"""Columns of :attr:`NormalisedRecords.records`, in order."""

NAME_MAX_LENGTH = 200
"""Longest given, middle or family name kept; longer values are dropped with a warning."""
TEXT_MAX_LENGTH = 500
"""Longest address or previous-family-names field kept."""
ID_MAX_LENGTH = 200
"""Longest record_id or household_id accepted."""
EARLIEST_DATE_OF_BIRTH = date(1900, 1, 1)
"""Dates of birth before this are treated as data-entry errors."""

Action = Literal["warning", "quarantine"]


@dataclass(frozen=True, slots=True)
class RecordIssue:
    """One problem found in one row (or, with ``row_number`` 0, in the file's header).

    Attributes:
        source: The file name or county id given to :func:`normalise_records`.
        row_number: 1-based data row (1 = first row after the header); 0 for file-level issues
            such as a missing or ignored column.
        record_id: The row's record_id if it has one.
        column: The canonical column concerned, or None for whole-row problems. For ignored
            export columns, the export's column name.
        reason: Plain English; names the column and the rule, never the value.
        action: ``"warning"`` (the value was dropped or cleaned, the row kept) or
            ``"quarantine"`` (the row was left out).
    """

    source: str
    row_number: int
    record_id: str | None
    column: str | None
    reason: str
    action: Action


@dataclass(frozen=True, eq=False)
class NormalisedRecords:
    """The result of :func:`normalise_records`.

    Attributes:
        records: Accepted rows only, columns :data:`OUTPUT_COLUMNS`. ``row_number`` is int64;
            every other column has object dtype holding ``str`` or ``None`` (never ``""`` or
            NaN) so that "missing" has exactly one spelling.
        issues: Every issue, ordered by row and then column; file-level issues (row 0) first.
    """

    records: pd.DataFrame
    issues: tuple[RecordIssue, ...]

    @property
    def quarantined(self) -> tuple[RecordIssue, ...]:
        """One issue per quarantined row, its reasons joined with ``"; "``."""
        return tuple(i for i in self.issues if i.action == "quarantine")

    @property
    def warnings(self) -> tuple[RecordIssue, ...]:
        """Issues about values that were dropped or cleaned in rows that may still be kept."""
        return tuple(i for i in self.issues if i.action == "warning")


# --------------------------------------------------------------------------------------------
# Single-value helpers

# Letters that Unicode decomposition does not reduce to ASCII.
_SPECIAL_LETTERS = str.maketrans(
    {
        "ß": "ss",
        "ẞ": "ss",
        "æ": "ae",
        "Æ": "ae",
        "œ": "oe",
        "Œ": "oe",
        "ø": "o",
        "Ø": "o",
        "ł": "l",
        "Ł": "l",
        "đ": "d",
        "Đ": "d",
        "ð": "d",
        "Ð": "d",
        "þ": "th",
        "Þ": "th",
        "ħ": "h",
        "Ħ": "h",
        "ı": "i",
        "ŧ": "t",
        "Ŧ": "t",
        "ŀ": "l",
        "Ŀ": "l",
    }
)
# Apostrophes join the parts of a name (O'Brien, D'Arcy) rather than separating them.
_APOSTROPHES = dict.fromkeys(map(ord, "'’‘ʼʻ`´′"), None)
_NON_LETTERS_ASCII = re.compile(r"[^a-z]+")
_NON_ALNUM = re.compile(r"[\W_]+")


def _strip_marks(value: str) -> str:
    decomposed = unicodedata.normalize("NFKD", value)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def _fold(value: str) -> str:
    """Case-fold, fold Latin diacritics to ASCII and drop apostrophes."""
    if value.isascii():  # the common case, several times faster than the general one
        return value.lower().replace("'", "").replace("`", "")
    folded = value.translate(_SPECIAL_LETTERS)
    if not folded.isascii():
        folded = _strip_marks(folded)
    folded = folded.casefold()
    if not folded.isascii():
        # casefold can introduce marks again (İ -> i + combining dot).
        folded = _strip_marks(folded).translate(_SPECIAL_LETTERS)
    return folded.translate(_APOSTROPHES)


def normalise_name(value: str) -> str:
    """Normalise a personal name for comparison.

    Case-folds; folds Latin diacritics to ASCII (é->e, ß->ss, ø->o, ł->l, æ->ae); removes
    apostrophes (O'Brien -> obrien); turns every other non-letter (hyphens, punctuation, digits,
    control characters, formula prefixes such as ``=``) into a space; collapses spaces. Letters
    of other scripts are kept as they are.

    Args:
        value: The name as written.

    Returns:
        The normalised name; ``""`` if nothing is left.

    Example:
        >>> normalise_name("  Zoë  Smith-JONES ")
        'zoe smith jones'
    """
    folded = _fold(value)
    if folded.isascii():
        return " ".join(_NON_LETTERS_ASCII.sub(" ", folded).split())
    # Other scripts: keep letters and the marks that belong to them (e.g. Devanagari vowel
    # signs); everything else, including numerals of any script, separates words.
    kept = "".join(ch if ch.isalpha() or _is_mark(ch) else " " for ch in folded)
    return " ".join(kept.split())


def _is_mark(ch: str) -> bool:
    return unicodedata.category(ch).startswith("M")


def _normalise_address(value: str) -> str:
    return " ".join(_NON_ALNUM.sub(" ", _fold(value)).split())


@cache
def nicknames() -> Mapping[str, str]:
    """The nickname table: normalised variant -> canonical given name.

    Loaded once from ``linkage/data/nicknames.csv`` (columns ``canonical,variant``).

    Returns:
        A read-only mapping, e.g. ``nicknames()["bill"] == "william"``.

    Raises:
        LinkageError: If the packaged table is inconsistent (a variant with two canonical
            names, or a canonical name that is itself a variant).
    """
    text = resources.files("linkage").joinpath("data/nicknames.csv").read_text(encoding="utf-8")
    table: dict[str, str] = {}
    for row in csv.DictReader(text.splitlines()):
        canonical = normalise_name(row["canonical"])
        variant = normalise_name(row["variant"])
        if table.get(variant, canonical) != canonical:
            raise LinkageError(f"nicknames.csv: {variant!r} has two canonical names")
        table[variant] = canonical
    chained = set(table) & set(table.values())
    if chained:
        raise LinkageError(f"nicknames.csv: canonical names also listed as variants: {chained}")
    return MappingProxyType(table)


def _canonical_of_normalised(name: str) -> str:
    first, _, rest = name.partition(" ")
    canonical = nicknames().get(first, first)
    return f"{canonical} {rest}" if rest else canonical


def canonical_given_name(value: str) -> str:
    """The normalised given name with its first word replaced by its canonical form.

    Args:
        value: A given name as written, e.g. ``"Bill"`` or ``"Billy-Joe"``.

    Returns:
        e.g. ``"william"`` or ``"william joe"``; ``""`` if the name has no letters.
    """
    name = normalise_name(value)
    return _canonical_of_normalised(name) if name else ""


_NHS_WEIGHTS = np.arange(10, 1, -1)  # weights 10..2 for the first nine digits
_NHS_SEPARATORS = re.compile("[\\s\u00a0-]")


def nhs_number_is_valid(digits: str) -> bool:
    """Whether ``digits`` is a well-formed NHS number.

    Spaces and hyphens are ignored. The number must then be ten ASCII digits whose last digit
    is the modulus-11 check digit of the first nine (weights 10 down to 2; a check value of 11
    means 0, a check value of 10 never occurs in an issued number). Numbers whose digits are all
    the same (``0000000000``, ``9999999999``) pass that check but are placeholders, so they are
    refused: linking on one would join unrelated children.

    Args:
        digits: The number, e.g. ``"943 476 5919"``.

    Returns:
        True if valid.
    """
    compact = _NHS_SEPARATORS.sub("", digits)
    if len(compact) != 10 or not compact.isascii() or not compact.isdigit():
        return False
    if compact == compact[0] * 10:
        return False
    total = sum(int(d) * w for d, w in zip(compact[:9], range(10, 1, -1), strict=True))
    check = 11 - total % 11
    check = 0 if check == 11 else check
    return check != 10 and check == int(compact[9])


# Outward code (A9, A99, AA9, AA99, A9A, AA9A, with the letters each position may hold) and
# inward code (digit + two letters, never C, I, K, M, O or V).
_POSTCODE = re.compile(
    r"([A-PR-UWYZ][0-9][0-9]?|[A-PR-UWYZ][A-HK-Y][0-9][0-9]?"
    r"|[A-PR-UWYZ][0-9][A-HJKPSTUW]|[A-PR-UWYZ][A-HK-Y][0-9][ABEHMNPRVWXY])"
    r"([0-9][ABD-HJLNP-UW-Z]{2})"
)


def normalise_postcode(value: str) -> str | None:
    """Normalise a UK postcode to upper case with one space before the inward code.

    Args:
        value: e.g. ``" cv12ab"``.

    Returns:
        e.g. ``"CV1 2AB"``, or None if ``value`` is not a valid UK postcode. NHS pseudo-postcodes
        (``ZZ99 …``, "no fixed abode") are not addresses and give None.
    """
    compact = "".join(value.split()).upper()
    if compact == "GIR0AA":
        return "GIR 0AA"
    match = _POSTCODE.fullmatch(compact)
    if match is None:
        return None
    return f"{match[1]} {match[2]}"


# --------------------------------------------------------------------------------------------
# Per-distinct-value cell rules: each returns the clean value(s) and a problem or None.
# Problems are phrased to follow the column name ("date_of_birth is not a real calendar date").

_FORMULA_PREFIXES = ("=", "+", "-", "@")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Invisible formatting characters (zero-width, bidirectional overrides) that could disguise a
# name shown in an alert.
_INVISIBLE = re.compile(r"[\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")


def _hygiene(value: str, parts: Sequence[str] = ()) -> list[str]:
    """Notes on characters that are harmless here but dangerous downstream.

    A leading ``=``, ``+``, ``-`` or ``@`` makes a spreadsheet run the cell as a formula if a
    name is ever exported to CSV and opened; control and invisible characters can disguise a
    name shown in an alert. Both are stripped (names keep letters only; display names lose
    them), and reported so the county can clean its source system.
    """
    notes = []
    if any(p.startswith(_FORMULA_PREFIXES) for p in (value, *parts)):
        notes.append("begins with a spreadsheet formula character (=, +, - or @), removed")
    if _CONTROL.search(value) or _INVISIBLE.search(value):
        notes.append("contains control or invisible characters, removed")
    return notes


def _display(value: str) -> str | None:
    cleaned = _INVISIBLE.sub("", _CONTROL.sub(" ", value))
    cleaned = " ".join(cleaned.split()).lstrip("=+-@ ")
    return cleaned or None


def _joined(notes: list[str]) -> str | None:
    return "; ".join(notes) if notes else None


def _name_cell(raw: str) -> tuple[str | None, str | None, str | None]:
    """(normalised, display, problem) for a given, middle or family name."""
    value = raw.strip()
    if not value:
        return None, None, None
    if len(value) > NAME_MAX_LENGTH:
        return None, None, f"is too long (more than {NAME_MAX_LENGTH} characters); ignored"
    notes = _hygiene(value)
    name = normalise_name(value)
    if not name:
        return None, None, "; ".join([*notes, "has no letters; ignored"])
    return name, _display(value), _joined(notes)


def _previous_names_cell(raw: str) -> tuple[str | None, str | None]:
    value = raw.strip()
    if not value:
        return None, None
    if len(value) > TEXT_MAX_LENGTH:
        return None, f"is too long (more than {TEXT_MAX_LENGTH} characters); ignored"
    parts = [p.strip() for p in value.split(";")]
    notes = _hygiene(value, parts)
    names = list(dict.fromkeys(n for n in map(normalise_name, parts) if n))
    if not names:
        return None, "; ".join([*notes, "has no letters; ignored"])
    return ";".join(names), _joined(notes)


def _address_cell(raw: str) -> tuple[str | None, str | None]:
    value = raw.strip()
    if not value:
        return None, None
    if len(value) > TEXT_MAX_LENGTH:
        return None, f"is too long (more than {TEXT_MAX_LENGTH} characters); ignored"
    address = _normalise_address(value)
    return (address, None) if address else (None, "has no letters or digits; ignored")


_SEX_CODES = {
    **dict.fromkeys(["m", "male", "man", "boy", "1"], "M"),
    **dict.fromkeys(["f", "female", "woman", "girl", "2"], "F"),
    # ISO/IEC 5218 and NHS data dictionary codes for "not known" / "not specified".
    **dict.fromkeys(
        [
            "u",
            "unknown",
            "not known",
            "not stated",
            "not specified",
            "indeterminate",
            "i",
            "0",
            "9",
        ],
        "U",
    ),
}
_ROLE_CODES = {
    **dict.fromkeys(["child", "c", "children", "young person", "yp", "cyp"], "child"),
    **dict.fromkeys(["adult", "a", "parent", "carer", "guardian"], "adult"),
    **dict.fromkeys(["unknown", "not known", "u"], "unknown"),
}


def _code_cell(
    raw: str, custom: Mapping[str, str], builtin: Mapping[str, str], unknown: str, problem: str
) -> tuple[str | None, str | None]:
    key = _code_key(raw)
    if not key:
        return None, None
    code = custom.get(key) or builtin.get(key)
    if code is None:
        return None, problem
    return (None, None) if code == unknown else (code, None)


# A trailing time of day, as exports of datetime columns (and Parquet timestamps) carry.
_TIME_SUFFIX = re.compile(
    r"[ T][0-9]{1,2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?(?:Z|[+-][0-9]{2}:?[0-9]{2})?$"
)
_HUMAN_DIRECTIVES = {"%d": "DD", "%m": "MM", "%Y": "YYYY", "%b": "Mon", "%B": "Month", "%%": "%"}


def _human_format(date_format: str) -> str:
    return re.sub(r"%.", lambda m: _HUMAN_DIRECTIVES.get(m[0], m[0]), date_format)


def _date_cell(
    raw: str, patterns: Sequence[re.Pattern[str]], expected: str, today: date
) -> tuple[str | None, str | None]:
    value = raw.strip()
    if not value:
        return None, None
    value = _TIME_SUFFIX.sub("", value) if len(value) <= 64 else value
    match = next((m for p in patterns if (m := p.match(value))), None)
    if match is None:
        return None, f"is not a date in the expected format ({expected}); left empty"
    month = month_number(match)
    try:
        if month is None:
            raise ValueError("unknown month name")
        born = date(int(match["Y"]), month, int(match["d"]))
    except ValueError:
        return None, "is not a real calendar date; left empty"
    if born > today:
        return None, "is in the future; left empty"
    if born < EARLIEST_DATE_OF_BIRTH:
        return None, f"is before {EARLIEST_DATE_OF_BIRTH.year}; left empty"
    return born.isoformat(), None


def _postcode_cell(raw: str) -> tuple[str | None, str | None, str | None, str | None]:
    """(postcode, district, sector, problem)."""
    if not raw.strip():
        return None, None, None, None
    postcode = normalise_postcode(raw)
    if postcode is None:
        if "".join(raw.split()).upper().startswith("ZZ99"):
            problem = "is an NHS pseudo-postcode (no fixed abode or not known); left empty"
        else:
            problem = "is not a valid UK postcode; left empty"
        return None, None, None, problem
    district, inward = postcode.split(" ")
    return postcode, district, f"{district} {inward[0]}", None


# --------------------------------------------------------------------------------------------
# Column machinery


def _per_distinct(values: Any, rule: Callable[[Any], tuple[Any, ...]]) -> list[np.ndarray]:
    """Apply ``rule`` once per distinct value and spread its outputs back over the rows.

    Missing values (None/NaN) are not passed to ``rule``; every output is None for them.

    Returns:
        One object array per element of the tuples ``rule`` returns.
    """
    codes, uniques = pd.factorize(values)
    results = [rule(u) for u in uniques.tolist()]
    width = len(rule("")) if not results else len(results[0])
    outputs = []
    for k in range(width):
        table = np.empty(len(results) + 1, dtype=object)
        table[:-1] = [r[k] for r in results]
        table[-1] = None  # code -1 (missing) picks this slot
        outputs.append(table[codes])
    return outputs


def _text(raw: pd.DataFrame, column: str, n: int) -> pd.Series:
    """A column as pyarrow-backed text with ``""`` for missing, whatever it was given as."""
    if column not in raw.columns:
        return pd.Series([""] * n, dtype="str")
    series = raw[column].reset_index(drop=True)
    if isinstance(series.dtype, pd.StringDtype) and not series.hasnans:
        return series
    if pd.api.types.is_float_dtype(series.dtype):
        # Whole numbers held as floats (an int column with gaps) keep their digits: 7, not 7.0.
        present = series.dropna()
        if (present == present.round()).all():
            series = series.astype("Int64")
    as_object = series.astype(object)
    return as_object.where(as_object.notna(), "").astype("str")


class _Issues:
    """Collects per-cell problems as arrays, then builds RecordIssue objects once."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.cells: dict[str, np.ndarray] = {}

    def add(self, column: str, reasons: np.ndarray) -> None:
        """Record ``column`` + problem for every row whose entry in ``reasons`` is not None."""
        rows = np.flatnonzero(pd.notna(reasons))
        if rows.size == 0:
            return
        # Problems come from a handful of fixed phrases: prefix each distinct one once.
        found = reasons[rows]
        prefixed = {r: f"{column} {r}" for r in set(found)}
        texts = np.array([prefixed[r] for r in found], dtype=object)
        current = self.cells.get(column)
        if current is None:
            current = self.cells[column] = np.full(self.n, None, dtype=object)
            current[rows] = texts
            return
        for row, text in zip(rows.tolist(), texts.tolist(), strict=True):
            current[row] = text if current[row] is None else f"{current[row]}; {text}"

    def add_at(self, column: str, row: int, problem: str) -> None:
        reasons = np.full(self.n, None, dtype=object)
        reasons[row] = problem
        self.add(column, reasons)


def normalise_records(
    raw: pd.DataFrame,
    *,
    source: str,
    mapping: ColumnMapping | None = None,
    today: date | None = None,
) -> NormalisedRecords:
    """Validate and normalise a county's records.

    Args:
        raw: Text frame from :func:`linkage.records.read_county_file` (or any frame with
            canonical column names; absent columns count as empty, non-text values are
            converted to text, and ``row_number`` defaults to 1..n).
        source: File name or county id, copied into every issue.
        mapping: Supplies ``date_format``, ``sex_codes`` and ``role_codes``. Defaults to the
            mapping ``read_county_file`` used, else ISO dates and the built-in codes.
        today: Dates of birth after this are refused; defaults to today's date.

    Returns:
        The accepted rows in canonical form (see :class:`NormalisedRecords` and
        :data:`OUTPUT_COLUMNS`) and every issue found. Rules, per column:

        * names: :func:`normalise_name`; ``given_canonical`` via :func:`canonical_given_name`;
          ``previous_family_names`` split on ``;``, each normalised, de-duplicated and joined
          with ``;``; ``display_*`` keep the original spelling minus control characters and
          formula prefixes. Names longer than :data:`NAME_MAX_LENGTH` or with no letters ->
          None with a warning; formula prefixes and control characters -> a warning.
        * ``date_of_birth``: parsed with the mapping's format (or ISO) -> ISO text; not a date,
          not a real date, in the future or before :data:`EARLIEST_DATE_OF_BIRTH` -> None with a
          warning.
        * ``sex``: M/F/Male/Female/1/2/boy/girl/... or the mapping's codes -> ``"M"``/``"F"``;
          known "unknown" codes -> None silently; anything else -> None with a warning.
        * ``role``: child/adult (and synonyms such as parent, carer, young person, or the
          mapping's codes); anything else -> None with a warning.
        * ``nhs_number``: see :func:`nhs_number_is_valid`; invalid -> None with a warning.
        * ``postcode``: see :func:`normalise_postcode`, plus ``postcode_district`` ("CV1") and
          ``postcode_sector`` ("CV1 2"); invalid -> None with a warning.
        * ``address``: folded like names but keeping digits; too long -> None with a warning.
        * rows are quarantined for an empty, over-long or repeated ``record_id`` (every
          occurrence after the first; the reason names the earlier row), for having no given
          name, family name or date of birth, or for having the wrong number of CSV fields.

        Warnings are reported for quarantined rows too, so a county can fix a row in one pass.

    Raises:
        InputError: If ``raw`` has no ``record_id`` column.
    """
    if "record_id" not in raw.columns:
        raise InputError(f"{source}: no record_id column")
    report = read_report(raw)
    if mapping is None and report is not None:
        mapping = report.mapping
    today = today or date.today()
    n = len(raw)
    issues = _Issues(n)
    file_issues: list[RecordIssue] = []

    if ROW_NUMBER in raw.columns:
        row_numbers = pd.to_numeric(raw[ROW_NUMBER]).to_numpy(dtype=np.int64)
    else:
        row_numbers = np.arange(1, n + 1, dtype=np.int64)
    text = {column: _text(raw, column, n) for column in CANONICAL_COLUMNS}
    out: dict[str, np.ndarray] = {}

    # --- identifiers
    record_ids = text["record_id"].str.strip()
    ids = record_ids.to_numpy(dtype=object)
    id_lengths = record_ids.str.len().to_numpy()
    household = text["household_id"].str.strip()
    household_values = household.to_numpy(dtype=object)
    household_long = household.str.len().to_numpy() > ID_MAX_LENGTH
    household_values[household_long | (household == "").to_numpy()] = None
    out["household_id"] = household_values
    household_problem = np.full(n, None, dtype=object)
    household_problem[household_long] = (
        f"is too long (more than {ID_MAX_LENGTH} characters); ignored"
    )
    issues.add("household_id", household_problem)

    # --- coded values
    role_codes = mapping.role_codes if mapping is not None else {}
    out["role"], role_problem = _per_distinct(
        text["role"],
        lambda v: _code_cell(
            v,
            role_codes,
            _ROLE_CODES,
            "unknown",
            "is not a recognised role (child or adult); left empty",
        ),
    )
    issues.add("role", role_problem)
    sex_codes = mapping.sex_codes if mapping is not None else {}
    out["sex"], sex_problem = _per_distinct(
        text["sex"],
        lambda v: _code_cell(
            v, sex_codes, _SEX_CODES, "U", "is not a recognised sex code; left empty"
        ),
    )
    issues.add("sex", sex_problem)

    # --- names
    for column in ("given_name", "middle_names", "family_name"):
        out[column], display, problem = _per_distinct(text[column], _name_cell)
        issues.add(column, problem)
        if column == "given_name":
            out["display_given_name"] = display
        elif column == "family_name":
            out["display_family_name"] = display
    (out["given_canonical"],) = _per_distinct(
        out["given_name"], lambda v: (_canonical_of_normalised(v),)
    )
    out["previous_family_names"], problem = _per_distinct(
        text["previous_family_names"], _previous_names_cell
    )
    issues.add("previous_family_names", problem)

    # --- date of birth
    date_format = mapping.date_format if mapping is not None else DEFAULT_DATE_FORMAT
    patterns = list(dict.fromkeys([date_pattern(date_format), date_pattern(DEFAULT_DATE_FORMAT)]))
    expected = _human_format(date_format)
    out["date_of_birth"], problem = _per_distinct(
        text["date_of_birth"], lambda v: _date_cell(v, patterns, expected, today)
    )
    issues.add("date_of_birth", problem)

    # --- NHS number, postcode, address
    out["nhs_number"], problem = _nhs_numbers(text["nhs_number"])
    issues.add("nhs_number", problem)
    out["postcode"], out["postcode_district"], out["postcode_sector"], problem = _per_distinct(
        text["postcode"], _postcode_cell
    )
    issues.add("postcode", problem)
    out["address"], problem = _addresses(text["address"])
    issues.add("address", problem)

    # --- what read_county_file noticed
    if report is not None:
        file_issues.extend(_report_issues(report, source, row_numbers, issues))
    file_issues.extend(_column_issues(raw, report, source))

    # --- quarantine: rows that cannot be linked at all
    quarantine = np.full(n, None, dtype=object)
    quarantine_column = np.full(n, None, dtype=object)

    def flag(mask: np.ndarray, reasons: Any, column: str | None) -> None:
        for row in np.flatnonzero(mask):
            reason = reasons if isinstance(reasons, str) else reasons[row]
            if quarantine[row] is None:
                quarantine[row], quarantine_column[row] = reason, column
            else:
                quarantine[row] = f"{quarantine[row]}; {reason}"

    if report is not None and report.malformed_rows:
        position = {int(r): i for i, r in enumerate(row_numbers)}
        malformed = np.full(n, None, dtype=object)
        for row, fields in report.malformed_rows:
            if row in position:
                malformed[position[row]] = (
                    f"row has {fields} fields but the header has {report.header_fields}; "
                    "its columns may be misaligned"
                )
        flag(pd.notna(malformed), malformed, None)
    empty_id = id_lengths == 0
    flag(empty_id, "record_id is empty", "record_id")
    flag(
        id_lengths > ID_MAX_LENGTH,
        f"record_id is longer than {ID_MAX_LENGTH} characters",
        "record_id",
    )
    id_frame = pd.DataFrame({"id": record_ids, "row": row_numbers})[~empty_id]
    repeated = id_frame.duplicated("id", keep="first")
    if repeated.any():
        first_row = id_frame[~repeated].set_index("id")["row"]
        earlier = id_frame.loc[repeated, "id"].map(first_row)
        reasons = np.full(n, None, dtype=object)
        reasons[earlier.index.to_numpy()] = [
            f"record_id repeats the record_id of row {r}" for r in earlier.to_numpy()
        ]
        flag(pd.notna(reasons), reasons, "record_id")
    unlinkable = (
        pd.isna(out["given_name"]) & pd.isna(out["family_name"]) & pd.isna(out["date_of_birth"])
    )
    flag(unlinkable, "no given name, family name or date of birth to link on", None)

    keep = pd.isna(quarantine)
    records = _records_frame(out, ids, row_numbers, keep)
    all_issues = _build_issues(
        source, row_numbers, ids, issues, quarantine, quarantine_column, file_issues
    )
    return NormalisedRecords(records=records, issues=all_issues)


def _nhs_numbers(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Validate NHS numbers as arrays: they are nearly all distinct, so no per-value Python."""
    n = len(values)
    # pyarrow kernels directly: pandas falls back to per-value Python for this replace.
    stripped = pc.utf8_trim_whitespace(pa.array(values, type=pa.string()))
    compact = pc.replace_substring_regex(stripped, _NHS_SEPARATORS.pattern, "")
    present = pc.not_equal(stripped, "").to_numpy(zero_copy_only=False)
    ten = pc.match_substring_regex(compact, "^[0-9]{10}$").to_numpy(zero_copy_only=False)
    result = np.full(n, None, dtype=object)
    reasons = np.full(n, None, dtype=object)
    reasons[present & ~ten] = "is not 10 digits; left empty"
    rows = np.flatnonzero(ten)
    if rows.size:
        numbers = np.asarray(compact.to_numpy(zero_copy_only=False), dtype=object)[rows]
        ascii_codes = np.frombuffer("".join(numbers).encode("ascii"), dtype=np.uint8)
        digits = ascii_codes.reshape(-1, 10).astype(np.int64) - ord("0")
        check = 11 - (digits[:, :9] @ _NHS_WEIGHTS) % 11
        check[check == 11] = 0
        passes = (check != 10) & (check == digits[:, 9])
        placeholder = (digits == digits[:, :1]).all(axis=1)
        good = passes & ~placeholder
        result[rows[good]] = numbers[good]
        reasons[rows[~passes]] = "fails the NHS number check digit; left empty"
        reasons[rows[passes & placeholder]] = "is a placeholder (every digit the same); left empty"
    return result, reasons


def _addresses(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Normalise addresses; like NHS numbers they are nearly all distinct.

    ASCII addresses (nearly all of them) go through pyarrow kernels that do exactly what
    ``_address_cell`` does for ASCII text; the rest go through ``_address_cell`` itself.
    """
    stripped = pc.utf8_trim_whitespace(pa.array(values, type=pa.string()))
    folded = pc.replace_substring_regex(pc.ascii_lower(stripped), "['`]", "")
    folded = pc.utf8_trim(pc.replace_substring_regex(folded, "[^a-z0-9]+", " "), " ")
    result = np.asarray(folded.to_numpy(zero_copy_only=False), dtype=object)
    raw_empty = pc.equal(stripped, "").to_numpy(zero_copy_only=False)
    too_long = pc.greater(pc.utf8_length(stripped), TEXT_MAX_LENGTH).to_numpy(zero_copy_only=False)
    no_alnum = pc.equal(folded, "").to_numpy(zero_copy_only=False) & ~raw_empty
    reasons = np.full(len(values), None, dtype=object)
    reasons[no_alnum] = "has no letters or digits; ignored"
    reasons[too_long] = f"is too long (more than {TEXT_MAX_LENGTH} characters); ignored"
    result[raw_empty | no_alnum | too_long] = None

    other = np.flatnonzero(~pc.string_is_ascii(stripped).to_numpy(zero_copy_only=False))
    if other.size:
        result[other], reasons[other] = _per_distinct(values.iloc[other], _address_cell)
    return result, reasons


def _report_issues(
    report: ReadReport, source: str, row_numbers: np.ndarray, issues: _Issues
) -> list[RecordIssue]:
    """Turn cells that were not valid UTF-8 into issues (per cell, or file-level for the header)."""
    file_level: list[RecordIssue] = []
    problem = "was not valid UTF-8 and was decoded as Windows-1252; check the spelling"
    position = {int(r): i for i, r in enumerate(row_numbers)} if report.recoded_cells else {}
    for row, column in report.recoded_cells:
        if row == 0:
            file_level.append(
                RecordIssue(source, 0, None, column, f"{column} header {problem}", "warning")
            )
        elif row in position:
            issues.add_at(column, position[row], problem)
    return file_level


def _column_issues(raw: pd.DataFrame, report: ReadReport | None, source: str) -> list[RecordIssue]:
    """File-level warnings for canonical columns that are absent and export columns ignored."""
    present = set(raw.columns)
    missing = [c for c in CANONICAL_COLUMNS if c not in present]
    extra = [str(c) for c in raw.columns if c not in CANONICAL_COLUMNS and c != ROW_NUMBER]
    if report is not None:
        missing = list(dict.fromkeys([*report.missing_columns, *missing]))
        extra = list(dict.fromkeys([*report.extra_columns, *extra]))
    issues = [
        RecordIssue(source, 0, None, c, f"{c} column is missing; treated as empty", "warning")
        for c in missing
    ]
    issues += [
        RecordIssue(
            source, 0, None, c, "column is not part of the county record and was ignored", "warning"
        )
        for c in extra
    ]
    return issues


def _records_frame(
    out: dict[str, np.ndarray], ids: np.ndarray, row_numbers: np.ndarray, keep: np.ndarray
) -> pd.DataFrame:
    columns: dict[str, pd.Series] = {
        "row_number": pd.Series(row_numbers[keep], dtype="int64"),
        "record_id": pd.Series(ids[keep], dtype=object),
    }
    for name in OUTPUT_COLUMNS[2:]:
        columns[name] = pd.Series(out[name][keep], dtype=object)
    return pd.DataFrame(columns)


def _build_issues(
    source: str,
    row_numbers: np.ndarray,
    ids: np.ndarray,
    issues: _Issues,
    quarantine: np.ndarray,
    quarantine_column: np.ndarray,
    file_issues: list[RecordIssue],
) -> tuple[RecordIssue, ...]:
    order = {c: i for i, c in enumerate(CANONICAL_COLUMNS)}
    # Gather (row position, column rank, column, reason, action) as arrays and sort them with
    # numpy: a file with a systematic fault can produce an issue for nearly every row.
    positions: list[np.ndarray] = []
    ranks: list[np.ndarray] = []
    columns: list[np.ndarray] = []
    reasons: list[np.ndarray] = []
    actions: list[np.ndarray] = []

    def gather(rows: np.ndarray, rank: int, column: Any, reason: np.ndarray, action: str) -> None:
        positions.append(rows)
        ranks.append(np.full(rows.size, rank))
        columns.append(
            column[rows]
            if isinstance(column, np.ndarray)
            else np.full(rows.size, column, dtype=object)
        )
        reasons.append(reason[rows])
        actions.append(np.full(rows.size, action, dtype=object))

    for column, cell_reasons in issues.cells.items():
        gather(
            np.flatnonzero(pd.notna(cell_reasons)), order[column], column, cell_reasons, "warning"
        )
    # A row's quarantine issue comes before its warnings: it is the headline.
    gather(np.flatnonzero(pd.notna(quarantine)), -1, quarantine_column, quarantine, "quarantine")

    row_position = np.concatenate(positions)
    sort = np.lexsort((np.concatenate(ranks), row_position))
    row_position = row_position[sort]
    built = [
        RecordIssue(source, row, record_id or None, column, reason, action)
        for row, record_id, column, reason, action in zip(
            row_numbers[row_position].tolist(),
            ids[row_position].tolist(),
            np.concatenate(columns)[sort].tolist(),
            np.concatenate(reasons)[sort].tolist(),
            np.concatenate(actions)[sort].tolist(),
            strict=True,
        )
    ]
    return (*file_issues, *built)
