"""The Fellegi-Sunter model on tokens, built, trained and applied with Splink 5.

The matcher sees only the token columns of :mod:`linkage.tokenise`; every comparison here is
written against them: Dice (and overlap) coefficients on Bloom-filter words, equality of keyed
tokens. The SQL uses only ``bit_count``, ``&``, ``CAST``, ``LEAST`` and arithmetic, which
DuckDB and Spark SQL both run, so one model JSON serves both engines.

Training needs no labels: u by random sampling, m by expectation maximisation on two
blocking rules (each trains the comparisons it does not block on), and the prior from
deterministic rules. The model then *calibrates* its prior to the candidate pairs that its
blocking rules generate (a one-parameter EM over the Bayes factors): the probability that two
random records match shrinks as a federation grows, but the share of matches among blocked
candidates does not, so a probability threshold keeps its meaning from 15 thousand records to
a million. The default alert threshold is the one that maximises the F1 that the calibrated
probabilities themselves predict, which needs no ground truth.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from splink.internals.exceptions import SplinkException

from linkage.errors import ModelError
from linkage.tokenise import BloomSpec

__all__ = ["DEFAULT_THRESHOLD", "LinkageModel", "TrainingOptions", "model_settings"]

logger = logging.getLogger(__name__)

MODEL_FORMAT_VERSION = 1
#: Used only until a model has calibrated its own threshold.
DEFAULT_THRESHOLD = 0.9
UNIQUE_ID = "pseudonym"
SOURCE = "source_dataset"

#: The blocking rules that generate candidate pairs. Each is an equi-join on tokens, tight
#: enough to stay near linear in the size of the federation (counted at 1M records in
#: BENCHMARKS.md): date of birth (day and month in either order) with either initial, which
#: survives a new family name or a nickname; the NHS number; and phonetic names with any two
#: of the three parts of the date of birth, which survives one mistyped part. Records with
#: no date of birth block on their names alone.
BLOCKING_RULES: tuple[str, ...] = (
    "l.dob_unordered = r.dob_unordered AND l.blk_gi = r.blk_gi",
    "l.dob_unordered = r.dob_unordered AND l.blk_fi = r.blk_fi",
    "l.nhs = r.nhs",
    "l.blk_name = r.blk_name AND l.dob_ym = r.dob_ym",
    "l.blk_name = r.blk_name AND l.dob_yd = r.dob_yd",
    "l.blk_name = r.blk_name AND l.dob_md = r.dob_md",
    "l.blk_name = r.blk_name AND (l.dob IS NULL OR r.dob IS NULL)",
)


def _shared_bits(field_: str, words: int) -> str:
    return " + ".join(
        f"CAST(bit_count({field_}_bf_{i}_l & {field_}_bf_{i}_r) AS INTEGER)" for i in range(words)
    )


def _dice(field_: str, words: int) -> str:
    return f"(2.0 * ({_shared_bits(field_, words)}) / ({field_}_bf_n_l + {field_}_bf_n_r))"


def _overlap(field_: str, words: int) -> str:
    least = f"LEAST({field_}_bf_n_l, {field_}_bf_n_r)"
    return f"(1.0 * ({_shared_bits(field_, words)}) / {least})"


#: A name whose share of its county's records is at least 2**-COMMON_CLASS on both sides.
COMMON_CLASS = 6


def _common(field_: str) -> str:
    return f"GREATEST({field_}_fc_l, {field_}_fc_r) <= {COMMON_CLASS}"


def _null(*cols: str) -> str:
    return " OR ".join(f"{c}_l IS NULL OR {c}_r IS NULL" for c in cols)


def _level(sql: str, label: str, *, null: bool = False) -> dict[str, Any]:
    level: dict[str, Any] = {"sql_condition": sql, "label_for_charts": label}
    if null:
        level["is_null_level"] = True
    return level


def _comparisons(bloom: BloomSpec) -> list[dict[str, Any]]:
    w = bloom.words
    given, family = _dice("given", w), _dice("family", w)
    return [
        {
            "output_column_name": "given_name",
            "comparison_description": "Dice of given-name Bloom filters (nicknames resolved)",
            "comparison_levels": [
                _level(_null("given_bf_n"), "missing", null=True),
                _level(f"{given} >= 0.88 AND {_common('given')}", "identical, a common name"),
                _level(f"{given} >= 0.88", "identical"),
                _level(f"{given} >= 0.75", "very similar"),
                _level(f"{given} >= 0.6", "similar"),
                _level("ELSE", "different"),
            ],
        },
        {
            "output_column_name": "family_name",
            "comparison_description": "Dice similarity of family-name Bloom filters",
            "comparison_levels": [
                _level(_null("family_bf_n"), "missing", null=True),
                _level(f"{family} >= 0.88 AND {_common('family')}", "identical, a common name"),
                _level(f"{family} >= 0.88", "identical"),
                _level(f"{family} >= 0.75", "very similar"),
                _level(
                    f"{_overlap('surnames', w)} >= 0.82",
                    "shares a current or previous family name",
                ),
                _level(f"{family} >= 0.6", "similar"),
                _level("ELSE", "different"),
            ],
        },
        {
            "output_column_name": "date_of_birth",
            "comparison_description": "Date of birth tokens",
            "comparison_levels": [
                _level(_null("dob"), "missing", null=True),
                _level("dob_l = dob_r", "identical"),
                _level("dob_unordered_l = dob_unordered_r", "day and month swapped"),
                _level(
                    "dob_ym_l = dob_ym_r OR dob_yd_l = dob_yd_r OR dob_md_l = dob_md_r",
                    "one of day, month or year differs",
                ),
                _level("ELSE", "different"),
            ],
        },
        {
            "output_column_name": "nhs_number",
            "comparison_description": "NHS number token",
            "comparison_levels": [
                _level(_null("nhs"), "missing", null=True),
                _level("nhs_l = nhs_r", "identical"),
                _level("ELSE", "different"),
            ],
        },
        {
            "output_column_name": "sex",
            "comparison_description": "Sex token",
            "comparison_levels": [
                _level(_null("sex"), "missing", null=True),
                _level("sex_l = sex_r", "identical"),
                _level("ELSE", "different"),
            ],
        },
        {
            "output_column_name": "role",
            "comparison_description": "Child or adult (a child may have come of age since)",
            "comparison_levels": [
                _level(_null("role"), "missing", null=True),
                _level("role_l = role_r", "identical"),
                _level("ELSE", "different"),
            ],
        },
        {
            "output_column_name": "postcode",
            "comparison_description": "Postcode tokens",
            "comparison_levels": [
                _level(_null("postcode"), "missing", null=True),
                _level("postcode_l = postcode_r", "identical"),
                _level("postcode_district_l = postcode_district_r", "same district"),
                _level("ELSE", "different"),
            ],
        },
    ]


def model_settings(bloom: BloomSpec | None = None) -> dict[str, Any]:
    """Untrained Splink settings for tokens made under a spec with this Bloom shape."""
    return {
        "link_type": "link_only",
        "unique_id_column_name": UNIQUE_ID,
        "probability_two_random_records_match": 1e-4,
        "comparisons": _comparisons(bloom or BloomSpec()),
        "blocking_rules_to_generate_predictions": [
            {"blocking_rule": rule, "sql_dialect": "duckdb"} for rule in BLOCKING_RULES
        ],
        "retain_matching_columns": False,
        "retain_intermediate_calculation_columns": True,
        "additional_columns_to_retain": [],
        "em_convergence": 0.001,
        "max_iterations": 25,
    }


@dataclass(frozen=True)
class TrainingOptions:
    """Tunables of unsupervised training.

    Attributes:
        u_max_pairs: Random pairs sampled to estimate u probabilities.
        em_max_pairs: Cap on the blocked pairs each EM session uses.
        prior_recall: Assumed recall of the deterministic rules that estimate the prior.
        seed: Seed for sampling, so that training is repeatable.
    """

    u_max_pairs: float = 2e6
    em_max_pairs: float = 1.5e6
    prior_recall: float = 0.7
    seed: int = 42


#: EM sessions: each trains every comparison except the ones its rule blocks on. Both rules
#: pick pairs that are nearly all matches at any size of federation, so EM's match class is
#: the matches and m comes out as their real disagreement rates. (A loose rule such as "same
#: date of birth" is 1% matches among a million records, and EM then mistakes look-alike
#: non-matches for matches.) Splink finds the comparisons a rule fixes by the columns it
#: names; ``blk_name`` (phonetic given + family name) fixes the names without naming their
#: Bloom-filter columns, so the rule names them too (those conditions hold whenever the
#: names are present). Without NHS numbers, the date-of-birth rule stands in.
_EM_RULES: tuple[str, ...] = (
    "l.nhs = r.nhs",
    "l.dob = r.dob AND l.blk_name = r.blk_name "
    "AND l.given_bf_n = l.given_bf_n AND r.family_bf_n = r.family_bf_n",
)
_EM_FALLBACK_RULE = "l.dob = r.dob AND l.blk_gi = r.blk_gi"
_PRIOR_RULES: tuple[str, ...] = (
    "l.nhs = r.nhs",
    "l.dob = r.dob AND l.blk_name = r.blk_name",
)
#: Smallest m and u probabilities written into a model. EM leaves a level at exactly zero (or
#: "not observed") when no training pair reached it, which Splink 5 then refuses to load; and
#: an m of zero would make one disagreeing field (a mistyped NHS number that still passes its
#: check digit, a sex recorded wrongly) veto a match outright, which real data does not earn.
_MIN_M = 0.005
_MIN_U = 1e-6


@dataclass
class LinkageModel:
    """A trained (or untrained) Fellegi-Sunter model over token columns.

    Attributes:
        settings: The Splink settings dictionary, including trained m and u probabilities.
        threshold: Alert threshold on calibrated match probability.
        metadata: Provenance: token spec fingerprint, training sizes, calibration.
    """

    settings: dict[str, Any]
    threshold: float = DEFAULT_THRESHOLD
    metadata: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """The model as JSON-ready data."""
        return {
            "format_version": MODEL_FORMAT_VERSION,
            "threshold": self.threshold,
            "metadata": self.metadata,
            "splink_settings": self.settings,
        }

    def save(self, path: Path) -> None:
        """Write the model as JSON."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> LinkageModel:
        """Read a model written by :meth:`save`.

        Raises:
            ModelError: The file is missing, not JSON, or of an unknown format version.
        """
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"cannot read model {path}: {e}") from e
        if not isinstance(data, dict) or data.get("format_version") != MODEL_FORMAT_VERSION:
            version = data.get("format_version") if isinstance(data, dict) else None
            raise ModelError(f"{path}: not a Jigsaw model (format {version!r})")
        try:
            settings = data["splink_settings"]
            if not isinstance(settings, dict) or not isinstance(settings.get("comparisons"), list):
                raise TypeError("splink_settings has no comparisons")
            return cls(
                settings=settings,
                threshold=float(data["threshold"]),
                metadata=dict(data.get("metadata", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"{path}: incomplete model ({e})") from e

    @property
    def trained(self) -> bool:
        """True once every comparison level has m and u probabilities."""
        return all(
            "m_probability" in lvl and "u_probability" in lvl
            for c in self.settings["comparisons"]
            for lvl in c["comparison_levels"]
            if not lvl.get("is_null_level")
        )

    @property
    def prior(self) -> float:
        """The prior probability that a candidate pair matches."""
        return float(self.settings["probability_two_random_records_match"])

    @property
    def threshold_match_weight(self) -> float:
        """The alert threshold expressed as a match weight."""
        p = min(max(self.threshold, 1e-12), 1 - 1e-12)
        return math.log2(p / (1 - p))

    def level_labels(self) -> dict[str, dict[int, str]]:
        """For each comparison, its gamma value -> plain-English label (for explanations)."""
        out: dict[str, dict[int, str]] = {}
        for c in self.settings["comparisons"]:
            levels = [lvl for lvl in c["comparison_levels"] if not lvl.get("is_null_level")]
            # Splink numbers non-null levels from the top: highest gamma = most similar.
            n = len(levels)
            labels = {n - 1 - i: lvl["label_for_charts"] for i, lvl in enumerate(levels)}
            labels[-1] = "missing on one side"
            out[c["output_column_name"]] = labels
        return out

    def explain(self, partial_weights: Mapping[str, float]) -> list[tuple[str, str, float]]:
        """Name the comparison level behind each partial match weight of a scored pair.

        Args:
            partial_weights: ``mw_<comparison>`` (or bare comparison name) -> weight, as
                in a predictions row.

        Returns:
            ``(comparison, level label, weight)`` for each comparison, in model order.
            A weight of exactly zero on a comparison with a null level reads "missing".
        """
        out = []
        for c in self.settings["comparisons"]:
            name = c["output_column_name"]
            weight = partial_weights.get(f"mw_{name}", partial_weights.get(name))
            if weight is None or (isinstance(weight, float) and math.isnan(weight)):
                continue
            best, best_gap = "missing", math.inf
            for lvl in c["comparison_levels"]:
                if lvl.get("is_null_level"):
                    level_weight = 0.0
                else:
                    m = float(lvl.get("m_probability", 1.0))
                    u = float(lvl.get("u_probability", 1.0))
                    level_weight = math.log2(m / u)
                gap = abs(level_weight - float(weight))
                if gap < best_gap:
                    best, best_gap = lvl["label_for_charts"], gap
            out.append((name, best, round(float(weight), 3)))
        return out

    # ------------------------------------------------------------------ training
    @classmethod
    def untrained(
        cls, bloom: BloomSpec | None = None, *, spec_fingerprint: str = ""
    ) -> LinkageModel:
        """A model with comparisons and blocking rules but no parameters yet."""
        return cls(settings=model_settings(bloom), metadata={"token_spec": spec_fingerprint})

    def train(
        self,
        engine: Any,
        tables: Mapping[str, Any],
        *,
        options: TrainingOptions | None = None,
    ) -> LinkageModel:
        """Estimate the prior, u and m from token tables alone, then calibrate.

        Args:
            engine: A :class:`linkage.engine.SplinkEngine`.
            tables: County id -> registered token table (``engine.register``).
            options: Sampling sizes and seed.

        Returns:
            A new, trained and calibrated model; ``self`` is not changed.

        Raises:
            ModelError: Training failed (too few records, or Splink refused).
        """
        opts = options or TrainingOptions()
        total = engine.count_rows(tables)
        if len(tables) < 2 or total < 20:
            raise ModelError("training needs at least two counties and twenty records")
        linker = engine.linker(tables, copy.deepcopy(self.settings))
        # Splink reports each EM iteration at INFO; keep it for debugging only.
        logging.getLogger("splink").setLevel(logging.WARNING)
        try:
            linker.training.estimate_probability_two_random_records_match(
                list(_PRIOR_RULES), recall=opts.prior_recall
            )
            linker.training.estimate_u_using_random_sampling(
                max_pairs=opts.u_max_pairs, seed=opts.seed
            )
            # A level that no random pair reached (two NHS numbers equal, say) is rare, not
            # unknown: give it a u below what the sample could see, before EM relies on it.
            floor_u = 0.5 / opts.u_max_pairs
            settings, unseen = _floor_unseen_u(linker.misc.save_model_to_json(), floor_u)
            linker = engine.linker(tables, settings)
            # Below ~100k records every blocked pair fits; sampling would only add noise.
            em_max_pairs = opts.em_max_pairs if total > 100_000 else None
            for rule in _EM_RULES:
                try:
                    linker.training.estimate_parameters_using_expectation_maximisation(
                        rule, max_pairs=em_max_pairs
                    )
                except (ValueError, RuntimeError, SplinkException):
                    # Too few pairs under this rule (no NHS numbers recorded, say).
                    linker.training.estimate_parameters_using_expectation_maximisation(
                        _EM_FALLBACK_RULE, max_pairs=em_max_pairs
                    )
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"training failed: {e}") from e
        settings = _clamp(linker.misc.save_model_to_json(), unseen)
        trained = LinkageModel(settings=settings, metadata=dict(self.metadata))
        trained.metadata.update({"trained_on_records": total, "counties": len(tables)})
        return trained

    def calibrated(
        self, bayes_log2: np.ndarray, counts: np.ndarray, *, total_pairs: float
    ) -> LinkageModel:
        """Re-estimate the prior from the scored candidates and choose the alert threshold.

        Args:
            bayes_log2: Distinct log2 Bayes factors (match weight without the prior) of the
                candidate pairs, typically a histogram's bin centres.
            counts: How many candidate pairs have each value.
            total_pairs: Every cross-county pair there is (blocked or not).

        Returns:
            A model whose prior is the expected number of matches among the candidates
            divided by all pairs (a one-parameter EM, taking pairs outside the blocks as
            non-matches), and whose threshold maximises the F1 expected from the resulting
            probabilities. Neither step looks at any ground truth.
        """
        bayes = np.exp2(np.clip(bayes_log2, -200, 200))
        prior = _global_prior(bayes, counts, total_pairs, start=self.prior)
        odds = bayes * (prior / (1.0 - prior))
        threshold = _expected_f1_threshold(odds / (1.0 + odds), counts)
        settings = copy.deepcopy(self.settings)
        settings["probability_two_random_records_match"] = prior
        meta = dict(self.metadata)
        meta.update(
            {
                "candidate_pairs": int(counts.sum()),
                "total_pairs": int(total_pairs),
                "expected_matches": round(float(np.sum(counts * odds / (1.0 + odds))), 1),
                "prior": prior,
            }
        )
        return LinkageModel(settings=settings, threshold=threshold, metadata=meta)


def _is_probability(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _floor_unseen_u(
    settings: dict[str, Any], floor: float
) -> tuple[dict[str, Any], set[tuple[str, str]]]:
    """Give levels that random sampling never reached a small u; name them."""
    settings = copy.deepcopy(settings)
    unseen: set[tuple[str, str]] = set()
    for c in settings["comparisons"]:
        for lvl in c["comparison_levels"]:
            if lvl.get("is_null_level") or _is_probability(lvl.get("u_probability")):
                continue
            lvl["u_probability"] = floor
            unseen.add((c["output_column_name"], lvl["label_for_charts"]))
    return settings, unseen


def _clamp(settings: dict[str, Any], unseen_u: set[tuple[str, str]]) -> dict[str, Any]:
    """Make a trained model loadable and sane where training saw too little.

    A level that neither random pairs nor EM ever reached carries no evidence either way
    (m = u); one that EM never reached but random pairs did gets a small m; every m and u
    is kept off zero.
    """
    settings = copy.deepcopy(settings)
    for c in settings["comparisons"]:
        levels = [lvl for lvl in c["comparison_levels"] if not lvl.get("is_null_level")]
        for lvl in levels:
            key = (c["output_column_name"], lvl["label_for_charts"])
            m, u = lvl.get("m_probability"), lvl.get("u_probability")
            m_seen = _is_probability(m) and m > 0
            if key in unseen_u:
                # u is already the sampling floor; with no m either, the level is neutral.
                lvl["m_probability"] = max(m, _MIN_M) if m_seen else u
                continue
            lvl["m_probability"] = max(m, _MIN_M) if m_seen else _MIN_M
            lvl["u_probability"] = max(u, _MIN_U) if _is_probability(u) else _MIN_U
    return settings


def _global_prior(
    bayes: np.ndarray, counts: np.ndarray, total_pairs: float, *, start: float
) -> float:
    """Prior that two random records match: expected matches over all pairs, to a fixed point.

    Bayes factors come from u estimated on random pairs, so the prior they combine with is
    the one over all pairs, not the share of matches among blocked candidates (blocking on
    date of birth would otherwise count the same evidence twice).
    """
    if counts.sum() == 0 or total_pairs <= 0:
        return start
    pi = min(max(start, 1e-12), 0.5)
    for _ in range(500):
        odds = bayes * (pi / (1.0 - pi))
        new = float(np.sum(counts * odds / (1.0 + odds)) / total_pairs)
        new = min(max(new, 1e-12), 0.5)
        if abs(new - pi) <= 1e-6 * pi:
            return new
        pi = new
    return pi


def _expected_f1_threshold(probs: np.ndarray, counts: np.ndarray) -> float:
    """Threshold maximising expected F1 when each pair matches with its own probability."""
    if counts.sum() == 0:
        return DEFAULT_THRESHOLD
    order = np.argsort(probs)[::-1]
    p, c = probs[order], counts[order]
    expected_tp = np.cumsum(p * c)
    selected = np.cumsum(c)
    f1 = 2 * expected_tp / (selected + float((p * c).sum()))
    best = int(np.argmax(f1))
    order = p
    # Round down to two decimals so the threshold reads cleanly and errs towards recall.
    return float(max(0.5, min(0.99, math.floor(order[best] * 100) / 100)))


def pairs_frame_columns() -> list[str]:
    """Columns of a scored-pairs frame."""
    return [
        "county_l",
        "pseudonym_l",
        "county_r",
        "pseudonym_r",
        "match_weight",
        "match_probability",
    ]


def _as_frame(obj: Any) -> pd.DataFrame:
    return obj if isinstance(obj, pd.DataFrame) else obj.to_pandas()
