"""Plumbing shared by the analyst notebooks (not part of the ``linkage`` package).

* :func:`show` renders a Splink chart or an Altair chart **offline**: the chart's HTML carries
  vega, vega-lite and vega-embed inline (Splink's ``to_html(inline=True)``, the same document
  ``save_offline_chart`` writes; Altair's ``to_html(inline=True)``, which bundles them through
  ``vl-convert-python``), is saved under :func:`output_dir` for opening in a browser, and is
  shown in the notebook in an ``<iframe srcdoc>``. Nothing is loaded from a CDN, which county
  networks and CI machines cannot reach.
* :func:`tokenise_federation` plays every county node of a generated federation (the public
  ``prepare_county``) and maps the ground truth onto pseudonyms.
* :func:`frequency_alignment_attack` and :func:`cluster_filters` are a **small, illustrative
  frequency-alignment attack** for ``04_privacy_tradeoff.ipynb``. With salted filters
  (token spec 2.x) the attacker can pool only the filters made under one salt value, so both
  take the records' salt values (:func:`salt_values`) as partitions. It is a baseline that
  measures leakage, not a state-of-the-art cryptanalysis: ``scripts/attack_tokens.py`` holds
  the project's stronger attacks (calibrated clustering, graph matching, chains across salt
  values).

Settings from the environment:

* ``JIGSAW_NOTEBOOK_OUT``: folder for chart HTML files and other outputs (by default a fresh
  temporary folder, removed when the kernel stops, so that CI runs leave nothing behind).
"""

from __future__ import annotations

import atexit
import hashlib
import html
import logging
import os
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from IPython.display import HTML, display

from linkage import TokenSpec, prepare_county
from linkage.analysis import Pair, pseudonym_truth
from linkage.pipeline import PreparedCounty
from linkage.synthetic import SyntheticFederation
from linkage.tokenise import SALTS, BloomSpec

__all__ = [
    "NOTEBOOK_SECRET",
    "AttackResult",
    "FederationTokens",
    "cluster_filters",
    "exact_patterns",
    "filter_words",
    "frequency_alignment_attack",
    "output_dir",
    "quiet_splink",
    "repo_root",
    "salt_values",
    "show",
    "tokenise_federation",
    "values_by_record",
]

_OUTPUT_DIR: Path | None = None

#: Federation secret for **generated data only**: fixed so that the notebooks are repeatable.
#: Real nodes use the secret from ``jigsaw keys init``; the matcher never holds one.
NOTEBOOK_SECRET = hashlib.sha256(b"jigsaw notebooks: generated federations only").digest()


def quiet_splink() -> None:
    """Keep Splink's training chatter out of notebook outputs (errors still show).

    EM reports every comparison level that its training block never reaches; the model
    floors those on purpose (``linkage.model``), so the warnings say nothing new here.
    """
    logging.getLogger("splink").setLevel(logging.ERROR)
    logging.getLogger("splink.internals.expectation_maximisation").setLevel(logging.ERROR)


def repo_root() -> Path:
    """The repository's root: the nearest folder upwards holding ``pyproject.toml``."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "configs").is_dir():
            return folder
    raise FileNotFoundError("run the notebooks from inside the Jigsaw repository")


def output_dir() -> Path:
    """Where notebooks write charts and scratch files.

    ``JIGSAW_NOTEBOOK_OUT`` if set (created if missing, kept); otherwise a temporary folder that
    is removed when the kernel stops, so that CI runs leave nothing behind.
    """
    global _OUTPUT_DIR
    if _OUTPUT_DIR is None:
        configured = os.environ.get("JIGSAW_NOTEBOOK_OUT")
        if configured:
            _OUTPUT_DIR = Path(configured)
            _OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
        else:
            _OUTPUT_DIR = Path(tempfile.mkdtemp(prefix="jigsaw-notebook-"))
            # A folder nobody asked for goes with the kernel (set JIGSAW_NOTEBOOK_OUT to keep).
            atexit.register(shutil.rmtree, _OUTPUT_DIR, ignore_errors=True)
    return _OUTPUT_DIR


def show(chart: Any, name: str, *, height: int = 460) -> None:
    """Render a chart offline: save it as a standalone HTML file and show it inline.

    Args:
        chart: A Splink chart (from ``linker.visualisations`` or ``splink.blocking_analysis``)
            or an Altair chart.
        name: File name stem under :func:`output_dir`; the file opens in any browser, with no
            network.
        height: Height of the inline frame in pixels.

    Raises:
        RuntimeError: The chart's HTML would load a script from the network.
    """
    path = output_dir() / f"{name}.html"
    if hasattr(chart, "save_offline_chart"):  # a SplinkChart
        chart.save_offline_chart(str(path), overwrite=True, print_msg=False)
        document = path.read_text(encoding="utf-8")
    else:  # an Altair chart: vl-convert inlines the JavaScript bundle
        document = chart.to_html(inline=True)
        path.write_text(document, encoding="utf-8")
    if re.search(r"<script[^>]*\bsrc\s*=", document):
        raise RuntimeError(f"chart {name} would load a script from the network")
    display(
        HTML(
            f'<div><iframe srcdoc="{html.escape(document, quote=True)}" '
            f'style="width:100%;height:{height}px;border:none"></iframe>'
            f'<p style="font-size:smaller">saved as {html.escape(str(path))}</p></div>'
        )
    )


# ----------------------------------------------------------------------------- nodes
@dataclass(frozen=True)
class FederationTokens:
    """A generated federation as its nodes would publish it, with the truth on pseudonyms.

    Attributes:
        spec: The token spec every node used.
        prepared: County id -> the node's result (plaintext stays in here, as at a node).
        tables: County id -> token table: what the matcher receives.
        true_pairs: True cross-county pairs of one person, on pseudonyms.
    """

    spec: TokenSpec
    prepared: dict[str, PreparedCounty]
    tables: dict[str, pd.DataFrame]
    true_pairs: set[Pair]


def tokenise_federation(
    federation: SyntheticFederation,
    *,
    spec: TokenSpec | None = None,
    bloom: BloomSpec | None = None,
    secret: bytes = NOTEBOOK_SECRET,
    seed: int = 1,
) -> FederationTokens:
    """Tokenise every county of a generated federation as its node would.

    Args:
        federation: From ``linkage.generate_federation``.
        spec: Token spec (the default spec, or ``bloom`` on top of it, if omitted).
        bloom: Bloom-filter shape to use with the default spec.
        secret: Federation secret; :data:`NOTEBOOK_SECRET` by default, so that reruns give
            the same tokens and the same model.
        seed: Seed of the bit flips, so that reruns give the same filters; the i-th county
            uses ``seed + i``.
    """
    if spec is None:
        spec = TokenSpec(bloom=bloom) if bloom is not None else TokenSpec()
    tokeniser = spec.bind(secret)
    prepared = {
        county: prepare_county(county, raw, tokeniser, seed=seed + i)
        for i, (county, raw) in enumerate(federation.counties.items())
    }
    tables = {county: p.tokens for county, p in prepared.items()}
    truth = pseudonym_truth(federation.truth, {c: p.identities for c, p in prepared.items()})
    return FederationTokens(spec, prepared, tables, truth)


# ----------------------------------------------------------------------------- attack
@dataclass(frozen=True)
class AttackResult:
    """How a frequency-alignment attack fared.

    Attributes:
        records: Records with a value (the attack's targets).
        guessed: Records the attacker put a plaintext guess on.
        correct: Guesses that were right.
    """

    records: int
    guessed: int
    correct: int

    @property
    def reidentification_rate(self) -> float:
        """Share of all targets whose value the attacker guessed right."""
        return self.correct / self.records if self.records else 0.0

    @property
    def guess_precision(self) -> float:
        """Share of the attacker's guesses that were right."""
        return self.correct / self.guessed if self.guessed else 0.0


def frequency_alignment_attack(
    observed: Sequence[Hashable | None],
    actual: Sequence[str | None],
    reference: Sequence[str | None],
    *,
    top: int = 50,
    partitions: Sequence[Hashable] | None = None,
) -> AttackResult:
    """Guess plaintext by aligning the frequency ranks of encodings with a public frequency list.

    The attacker (the matcher, say) sees an encoding per record: a keyed token, an exact
    Bloom-filter pattern, or a cluster of similar filters. It ranks the distinct encodings by
    how many records carry them, ranks the values of a public list (a census, a telephone
    book: here another generated population) the same way, and guesses that the k-th most
    frequent encoding is the k-th most frequent value, for the ``top`` most frequent.

    Args:
        observed: The encoding of each record (``None`` where missing).
        actual: The true value of each record, only to score the attack.
        reference: The attacker's public sample of values.
        top: How many of the most frequent encodings the attacker aligns (in each partition).
        partitions: A group per record, when encodings are comparable only within a group
            (filters salted by a part of the date of birth: one group per salt value; keyed
            tokens that combine a name with the date of birth: one group per date token).
            Each group is ranked and aligned on its own.

    Returns:
        Targets, guesses and correct guesses.
    """
    if len(observed) != len(actual):
        raise ValueError("observed and actual must have one entry per record")
    groups: Sequence[Hashable] = [None] * len(observed) if partitions is None else partitions
    if len(groups) != len(observed):
        raise ValueError("partitions must have one entry per record")
    present = [
        (g, o, a) for g, o, a in zip(groups, observed, actual, strict=True) if o is not None and a
    ]
    values = [val for val, _ in Counter(v for v in reference if v).most_common(top)]
    counts: defaultdict[Hashable, Counter[Hashable]] = defaultdict(Counter)
    for g, o, _ in present:
        counts[g][o] += 1
    guess = {
        (g, enc): val
        for g, counter in counts.items()
        for (enc, _), val in zip(counter.most_common(top), values, strict=False)
    }
    guessed = [(guess[g, o], a) for g, o, a in present if (g, o) in guess]
    correct = sum(1 for g, a in guessed if g == a)
    return AttackResult(records=len(present), guessed=len(guessed), correct=correct)


def salt_values(prepared: Mapping[str, PreparedCounty], salt: str) -> list[str]:
    """Each record's salt value (the part of its date of birth that keys its filters under
    ``salt``; ``""`` without a date of birth), in the order of the concatenated token tables.

    The matcher can rebuild these partitions from the date-of-birth tokens (``dob_ym`` is the
    year and month; ``dob_dmu`` the decade with the unordered month and day); they are read
    from the plaintext here, which favours the attacker.
    """
    fn = SALTS[salt]
    return [fn(d) if d else "" for d in values_by_record(prepared, "date_of_birth")]


def filter_words(tokens: pd.DataFrame, field: str, words: int) -> npt.NDArray[np.uint64]:
    """The Bloom-filter words of one filter column (``given``, ``given_ym``, ...) as an
    ``(n, words)`` unsigned array (0 where missing)."""
    columns = [f"{field}_bf_{i}" for i in range(words)]
    signed = tokens[columns].fillna(0).to_numpy(dtype=np.int64)
    return signed.view(np.uint64)


def exact_patterns(tokens: pd.DataFrame, field: str, words: int) -> list[tuple[int, ...] | None]:
    """Each record's exact filter pattern (``None`` where the field is missing)."""
    matrix = filter_words(tokens, field, words)
    missing = tokens[f"{field}_bf_n"].isna().to_numpy()
    return [
        None if gone else tuple(row.tolist()) for row, gone in zip(matrix, missing, strict=True)
    ]


def cluster_filters(
    tokens: pd.DataFrame,
    field: str,
    words: int,
    *,
    min_dice: float = 0.88,
    flip: float = 0.0,
    partitions: Sequence[Hashable] | None = None,
) -> list[int | None]:
    """Group similar filters, as an attacker would to undo random bit flips.

    Leader clustering: take the first unassigned filter as a leader and give its cluster
    every unassigned filter (of the same partition) with a Dice coefficient of at least
    ``min_dice`` to it (0.88 is the model's own "identical name" level). With bit flips the
    Dice is the flip-corrected estimate the matcher itself uses, so that equal names score
    about 1 again. Each record's cluster id then stands in for its encoding in
    :func:`frequency_alignment_attack`.

    Args:
        tokens: Token tables, concatenated.
        field: Filter column prefix (``given``, ``given_ym``, ...).
        words: 64-bit words per filter.
        min_dice: Dice coefficient at which a filter joins a leader's cluster.
        flip: The spec's flip probability (0: plain Dice).
        partitions: A group per record (a salt value): filters of different groups are
            never clustered together.

    Returns:
        A cluster id per record (``None`` where the field is missing).
    """
    matrix = filter_words(tokens, field, words)
    missing = tokens[f"{field}_bf_n"].isna().to_numpy()
    counts = np.bitwise_count(matrix).sum(axis=1).astype(np.int64)
    groups = (
        np.zeros(len(matrix), dtype=np.int64)
        if partitions is None
        else pd.factorize(pd.Series(list(partitions), dtype=object))[0]
    )
    bits = 64 * words
    labels = np.full(len(matrix), -1, dtype=np.int64)
    labels[missing] = -2
    for i in range(len(matrix)):
        if labels[i] != -1:
            continue
        free = np.flatnonzero((labels == -1) & (groups == groups[i]))
        shared = np.bitwise_count(matrix[free] & matrix[i]).sum(axis=1).astype(np.int64)
        total = counts[free] + counts[i]
        if flip:
            # E[shared'] = (1-2p)^2 shared + p total' - n p^2 and E[pop'] = (1-2p) pop + n p.
            dice = (
                2.0
                * (shared - flip * total + bits * flip * flip)
                / ((1 - 2 * flip) * np.maximum(total - 2 * bits * flip, 1))
            )
        else:
            dice = 2.0 * shared / np.maximum(total, 1)
        labels[free[dice >= min_dice]] = i
        labels[i] = i
    return [None if label < 0 else int(label) for label in labels.tolist()]


def values_by_record(prepared: Mapping[str, PreparedCounty], column: str) -> list[str | None]:
    """A normalised plaintext column, in the order of the concatenated token tables."""
    out: list[str | None] = []
    for p in prepared.values():
        values = p.normalised.records.reset_index(drop=True)[column]
        out += [None if pd.isna(v) or v == "" else str(v) for v in values]
    return out
