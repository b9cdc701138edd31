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
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from splink.internals.exceptions import SplinkException

from linkage.errors import ModelError
from linkage.tokenise import BloomSpec, TokenSpec

__all__ = [
    "DEFAULT_THRESHOLD",
    "LinkageModel",
    "TrainingOptions",
    "blocking_rules",
    "model_settings",
]

logger = logging.getLogger(__name__)


def _expected_em_gap(record: logging.LogRecord) -> bool:
    """Drop Splink's "Level ... not observed in dataset, unable to train m value" warnings.

    Each EM pass blocks on some fields (the NHS number, or the date of birth and a name
    token), so the levels where those fields disagree cannot occur in it; their m comes from
    the other pass. The warnings are expected on every training and only alarm users.
    """
    return "not observed in dataset" not in record.getMessage()


logging.getLogger("splink.internals.expectation_maximisation").addFilter(_expected_em_gap)

MODEL_FORMAT_VERSION = 1
#: Used only until a model has calibrated its own threshold.
DEFAULT_THRESHOLD = 0.9
UNIQUE_ID = "pseudonym"
SOURCE = "source_dataset"

#: The blocking rules that generate candidate pairs. Each is an equi-join on tokens, tight
#: enough to stay near linear in the size of the federation (counted at 1M records in
#: BENCHMARKS.md): date of birth (day and month in either order) with either initial, which
#: survives a new family name or a nickname; the NHS number; and phonetic names with any two
#: of the three parts of the date of birth, which survives one mistyped part. Each joins on
#: one token that is already the conjunction (``linkage/tokenise.py``), so that no token of
#: a name alone is published. Records with no date of birth block on their NHS number only.
BLOCKING_RULES: tuple[str, ...] = (
    "l.dobu_gi = r.dobu_gi",
    "l.dobu_fi = r.dobu_fi",
    "l.nhs = r.nhs",
    "l.name_ym = r.name_ym",
    "l.name_yd = r.name_yd",
    "l.name_md = r.name_md",
)
#: The same conjunctions on the name-only tokens of token spec 1.x (``blk_gi``, ``blk_fi``,
#: ``blk_name``), with names alone for records that have no date of birth.
LEGACY_BLOCKING_RULES: tuple[str, ...] = (
    "l.dob_unordered = r.dob_unordered AND l.blk_gi = r.blk_gi",
    "l.dob_unordered = r.dob_unordered AND l.blk_fi = r.blk_fi",
    "l.nhs = r.nhs",
    "l.blk_name = r.blk_name AND l.dob_ym = r.dob_ym",
    "l.blk_name = r.blk_name AND l.dob_yd = r.dob_yd",
    "l.blk_name = r.blk_name AND l.dob_md = r.dob_md",
    "l.blk_name = r.blk_name AND (l.dob IS NULL OR r.dob IS NULL)",
)


def _double(x: float) -> str:
    """A DOUBLE literal in both engines' SQL. (``0.125`` is a DECIMAL to Spark, whose decimal
    arithmetic is boxed and made each blocked pair's comparisons twice as slow; the values
    here are exact in binary, so the results are the same.)"""
    return f"{float(x):.17e}"


def _shared_bits(field_: str, words: int) -> str:
    return " + ".join(
        f"CAST(bit_count({field_}_bf_{i}_l & {field_}_bf_{i}_r) AS INTEGER)" for i in range(words)
    )


# With bit flips (probability p, n bits), the observed shared bits and popcounts are biased
# towards a random filter's. Their expectations are linear in the unflipped ones:
#   E[pop'] = (1 - 2p) pop + n p,   E[shared'] = (1 - 2p)^2 shared + p (pop'_l + pop'_r) - n p^2,
# so the matcher compares the unbiased estimates of the unflipped Dice and overlap: identical
# names score about 1 whatever p is, and the level thresholds keep their meaning.
def _dice(field_: str, bloom: BloomSpec) -> str:
    words, p, n = bloom.words, bloom.flip_probability, bloom.bits
    total = f"({field_}_bf_n_l + {field_}_bf_n_r)"
    two = _double(2)
    if not p:
        return f"({two} * ({_shared_bits(field_, words)}) / {total})"
    return (
        f"({two} * (({_shared_bits(field_, words)}) - {_double(p)} * {total} "
        f"+ {_double(n * p * p)}) / ({_double(1 - 2 * p)} * GREATEST({total} "
        f"- {_double(2 * n * p)}, {_double(1)})))"
    )


def _overlap(field_: str, bloom: BloomSpec) -> str:
    words, p, n = bloom.words, bloom.flip_probability, bloom.bits
    least = f"LEAST({field_}_bf_n_l, {field_}_bf_n_r)"
    if not p:
        return f"({_double(1)} * ({_shared_bits(field_, words)}) / {least})"
    total = f"({field_}_bf_n_l + {field_}_bf_n_r)"
    return (
        f"((({_shared_bits(field_, words)}) - {_double(p)} * {total} + {_double(n * p * p)})"
        f" / ({_double(1 - 2 * p)} * GREATEST({least} - {_double(n * p)}, {_double(1)})))"
    )


#: When two records' filters under a salt were keyed by the same salt value, told by
#: date-of-birth tokens (conditions that imply equal salts; records without a date of birth
#: share the empty salt).
_SAME_SALT = {
    "ym": "dob_ym_l = dob_ym_r",
    "yd": "dob_yd_l = dob_yd_r",
    "year": "(dob_ym_l = dob_ym_r OR dob_yd_l = dob_yd_r)",
    "mdu": "(dob_md_l = dob_md_r OR dob_unordered_l = dob_unordered_r)",
    "dmu": "dob_dmu_l = dob_dmu_r",
}
_BOTH_UNDATED = "(dob_l IS NULL AND dob_r IS NULL)"


def _similarity(field_: str, bloom: BloomSpec, measure: Any) -> str:
    """A name field's similarity over its salted filters: the mean over the salts whose
    values agree for the pair, or -1 when none does (the names cannot be compared)."""
    if not bloom.salts:
        return str(measure(field_, bloom))
    same = _same_salts(bloom)
    total = " + ".join(
        f"CASE WHEN {c} THEN {measure(f'{field_}_{s}', bloom)} ELSE {_double(0)} END"
        for c, s in zip(same, bloom.salts, strict=True)
    )
    count = " + ".join(f"CASE WHEN {c} THEN 1 ELSE 0 END" for c in same)
    return f"COALESCE(({total}) / NULLIF({count}, 0), {_double(-1)})"


def _same_salts(bloom: BloomSpec) -> list[str]:
    return [f"({_SAME_SALT[s]} OR {_BOTH_UNDATED})" for s in bloom.salts]


def _missing_name(field_: str, bloom: BloomSpec) -> str:
    """A name missing on either side or, with salted filters, under no common salt value
    (told from date tokens alone, so that most random pairs never compute a Dice)."""
    popcounts = [f"{field_}{v}_bf_n" for v in bloom.views]
    if not bloom.salts:
        return _null(*popcounts)
    comparable = " OR ".join(_same_salts(bloom))
    return f"{_null(*popcounts)} OR NOT COALESCE({comparable}, FALSE)"


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


def _comparisons(bloom: BloomSpec, *, frequency_classes: bool) -> list[dict[str, Any]]:
    given, family = _similarity("given", bloom, _dice), _similarity("family", bloom, _dice)
    surnames = _similarity("surnames", bloom, _overlap)
    # With salted filters, "missing" also covers names that cannot be compared: no salt
    # value (part of the date of birth) agrees, so the filters are unrelated. The label stays
    # "missing" (alert explanations and analysts' notebooks read it).
    missing = "missing"
    common_given = (
        [_level(f"{given} >= 0.88 AND {_common('given')}", "identical, a common name")]
        if frequency_classes
        else []
    )
    common_family = (
        [_level(f"{family} >= 0.88 AND {_common('family')}", "identical, a common name")]
        if frequency_classes
        else []
    )
    return [
        {
            "output_column_name": "given_name",
            "comparison_description": "Dice of given-name Bloom filters (nicknames resolved)",
            "comparison_levels": [
                _level(_missing_name("given", bloom), missing, null=True),
                *common_given,
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
                _level(_missing_name("family", bloom), missing, null=True),
                *common_family,
                _level(f"{family} >= 0.88", "identical"),
                _level(f"{family} >= 0.75", "very similar"),
                _level(
                    f"{surnames} >= 0.82",
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


def _legacy(spec: TokenSpec) -> bool:
    """True for a spec with the name-only blocking tokens of spec 1.x instead of the combined."""
    return "blk_name" in spec.blocking and "name_ym" not in spec.blocking


def _spec(bloom: BloomSpec | None, spec: TokenSpec | None) -> TokenSpec:
    if spec is not None:
        return spec
    return TokenSpec(bloom=bloom) if bloom is not None else TokenSpec()


def blocking_rules(spec: TokenSpec | None = None) -> tuple[str, ...]:
    """The blocking rules for tokens made under ``spec`` (the default spec if ``None``)."""
    return LEGACY_BLOCKING_RULES if _legacy(_spec(None, spec)) else BLOCKING_RULES


def model_settings(
    bloom: BloomSpec | None = None, *, spec: TokenSpec | None = None
) -> dict[str, Any]:
    """Untrained Splink settings for tokens made under ``spec`` (its Bloom shape and blocking
    tokens), or under the default spec with this Bloom shape."""
    spec = _spec(bloom, spec)
    return {
        "link_type": "link_only",
        "unique_id_column_name": UNIQUE_ID,
        "probability_two_random_records_match": 1e-4,
        "comparisons": _comparisons(spec.bloom, frequency_classes=spec.frequency_classes),
        "blocking_rules_to_generate_predictions": [
            {"blocking_rule": rule, "sql_dialect": "duckdb"} for rule in blocking_rules(spec)
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


# EM sessions: each trains every comparison except the ones its rule blocks on. Both rules
# pick pairs that are nearly all matches at any size of federation, so EM's match class is
# the matches and m comes out as their real disagreement rates. (A loose rule such as "same
# date of birth" is 1% matches among a million records, and EM then mistakes look-alike
# non-matches for matches.) Splink finds the comparisons a rule fixes by the columns it
# names; ``name_ym`` (phonetic given + family name with year and month; ``blk_name`` in spec
# 1.x) fixes the names without naming their Bloom-filter columns, so the rule names them too
# (those conditions hold whenever the names are present). Salted name comparisons also name
# date-of-birth columns (to tell whether two filters share a salt), so a rule that names
# ``dob`` fixes them too. Without NHS numbers the fallback stands in; it names only the
# combined tokens, so that it trains the names.
def _training_rules(settings: Mapping[str, Any]) -> tuple[tuple[str, ...], str, tuple[str, ...]]:
    """EM rules, the EM fallback rule and the prior's rules, for the model's token design."""
    rules = [r["blocking_rule"] for r in settings["blocking_rules_to_generate_predictions"]]
    columns = " ".join(
        lvl["sql_condition"]
        for c in settings["comparisons"]
        if c["output_column_name"] in ("given_name", "family_name")
        for lvl in c["comparison_levels"]
    )
    given, family = (re.findall(rf"\b({f}\w*?)_bf_n", columns)[0] for f in ("given", "family"))
    names_present = f"l.{given}_bf_n = l.{given}_bf_n AND r.{family}_bf_n = r.{family}_bf_n"
    if any("blk_name" in r for r in rules):
        return (
            ("l.nhs = r.nhs", f"l.dob = r.dob AND l.blk_name = r.blk_name AND {names_present}"),
            "l.dob = r.dob AND l.blk_gi = r.blk_gi",
            ("l.nhs = r.nhs", "l.dob = r.dob AND l.blk_name = r.blk_name"),
        )
    return (
        ("l.nhs = r.nhs", f"l.dob = r.dob AND l.name_ym = r.name_ym AND {names_present}"),
        "l.dobu_gi = r.dobu_gi AND l.dobu_fi = r.dobu_fi",
        ("l.nhs = r.nhs", "l.dob = r.dob AND l.name_ym = r.name_ym"),
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
        cls,
        bloom: BloomSpec | None = None,
        *,
        spec_fingerprint: str = "",
        spec: TokenSpec | None = None,
    ) -> LinkageModel:
        """A model with comparisons and blocking rules but no parameters yet, for tokens
        made under ``spec`` (or under the default spec with this Bloom shape)."""
        return cls(
            settings=model_settings(bloom, spec=spec), metadata={"token_spec": spec_fingerprint}
        )

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
        em_rules, em_fallback, prior_rules = _training_rules(self.settings)
        linker = engine.linker(tables, copy.deepcopy(self.settings))
        # Splink reports each EM iteration at INFO; keep it for debugging only.
        logging.getLogger("splink").setLevel(logging.WARNING)
        try:
            linker.training.estimate_probability_two_random_records_match(
                list(prior_rules), recall=opts.prior_recall
            )
            linker.training.estimate_u_using_random_sampling(
                max_pairs=opts.u_max_pairs, seed=opts.seed
            )
            settings = _salted_names_u(engine, tables, linker.misc.save_model_to_json(), opts)
            # A level that no random pair reached (two NHS numbers equal, say) is rare, not
            # unknown: give it a u below what the sample could see, before EM relies on it.
            floor_u = 0.5 / opts.u_max_pairs
            settings, unseen = _floor_unseen_u(settings, floor_u)
            linker = engine.linker(tables, settings)
            # Below ~100k records every blocked pair fits; sampling would only add noise.
            em_max_pairs = opts.em_max_pairs if total > 100_000 else None
            for rule in em_rules:
                try:
                    linker.training.estimate_parameters_using_expectation_maximisation(
                        rule, max_pairs=em_max_pairs
                    )
                except (ValueError, RuntimeError, SplinkException):
                    # Too few pairs under this rule (no NHS numbers recorded, say).
                    linker.training.estimate_parameters_using_expectation_maximisation(
                        em_fallback, max_pairs=em_max_pairs
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


#: Comparisons of salted name filters.
_NAME_COMPARISONS = ("given_name", "family_name")
#: Pairs whose dates of birth agree (in either order): in a random sample nearly all matches.
_SAME_DATE = "(dob_l = dob_r OR dob_unordered_l = dob_unordered_r)"


def _salted_names_u(
    engine: Any, tables: Mapping[str, Any], settings: dict[str, Any], opts: TrainingOptions
) -> dict[str, Any]:
    """u of the salted name comparisons, from random pairs that are not near-certain matches.

    Salted filters compare only when a salt value (part of the date of birth) agrees, and
    random pairs that share one are rich in matches (in 15,000 records one pair in twenty
    that shares a year and month is the same person), which would inflate u for "identical"
    names. Among comparable random pairs with other dates of birth, matches are rare; u for
    the name levels is estimated on those (a second random sample, in which the rest count
    as not comparable) and every other u is kept.
    """
    salted = [
        c
        for c in settings["comparisons"]
        if c["output_column_name"] in _NAME_COMPARISONS
        and "NOT COALESCE(" in c["comparison_levels"][0]["sql_condition"]
    ]
    if not salted:
        return settings
    probe = copy.deepcopy(settings)
    probe["comparisons"] = copy.deepcopy(salted)  # only these are sampled again
    for c in probe["comparisons"]:
        null = c["comparison_levels"][0]
        null["sql_condition"] = f"({null['sql_condition']}) OR {_SAME_DATE}"
    linker = engine.linker(tables, probe)
    linker.training.estimate_u_using_random_sampling(max_pairs=opts.u_max_pairs, seed=opts.seed)
    estimated = {
        (c["output_column_name"], lvl["label_for_charts"]): lvl.get("u_probability")
        for c in linker.misc.save_model_to_json()["comparisons"]
        for lvl in c["comparison_levels"]
    }
    out = copy.deepcopy(settings)
    for c in out["comparisons"]:
        if c["output_column_name"] not in _NAME_COMPARISONS:
            continue
        for lvl in c["comparison_levels"]:
            u = estimated.get((c["output_column_name"], lvl["label_for_charts"]))
            if not lvl.get("is_null_level") and _is_probability(u):
                lvl["u_probability"] = u
    return out


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
