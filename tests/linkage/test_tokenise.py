"""Tests of keyed tokens: the token spec as data, the bound tokeniser, and what tokens reveal."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from linkage.errors import SecretError, TokenSpecError
from linkage.pipeline import PreparedCounty
from linkage.tokenise import (
    BLOOM_FIELDS,
    FREQUENCY_COLUMNS,
    BloomSpec,
    Tokeniser,
    TokenSpec,
    bloom_columns,
    bloom_views,
)

TOKEN_SPEC_TOML = Path(__file__).resolve().parents[2] / "configs" / "token_spec.toml"
OTHER_SECRET = bytes(range(100, 132))


# ----------------------------------------------------------------------------- helpers
def deterministic_columns(spec: TokenSpec) -> list[str]:
    return [*spec.exact, *spec.blocking]


def word_columns(spec: TokenSpec) -> list[str]:
    return [c for c in bloom_columns(spec.bloom) if not c.endswith("_bf_n")]


def bloom_bits(tokens: pd.DataFrame, field: str, words: int) -> np.ndarray:
    """The filters of one field as an (n, words) uint64 array (rows must be non-missing)."""
    cols = [f"{field}_bf_{i}" for i in range(words)]
    return tokens[cols].to_numpy(dtype=np.int64).view(np.uint64)


def dice(a: np.ndarray, b: np.ndarray, bloom: BloomSpec | None = None) -> np.ndarray:
    """Row-wise Dice coefficient of two (n, words) uint64 filter arrays; with a Bloom spec,
    the matcher's estimate of the Dice before the spec's bit flips (linkage/model.py)."""
    shared = np.bitwise_count(a & b).sum(axis=1)
    total = np.bitwise_count(a).sum(axis=1) + np.bitwise_count(b).sum(axis=1)
    if bloom is None or not bloom.flip_probability:
        return 2.0 * shared / total
    p, n = bloom.flip_probability, bloom.bits
    return 2.0 * (shared - p * total + n * p * p) / ((1 - 2 * p) * (total - 2 * n * p))


def first_view(spec: TokenSpec, field: str) -> str:
    """The column prefix of a name field's first filter (``given_ym``; ``given`` unsalted)."""
    return f"{field}{spec.bloom.views[0]}"


def token_values(tokens: pd.DataFrame, columns: list[str]) -> set[int]:
    values: set[int] = set()
    for c in columns:
        values |= set(tokens[c].dropna().astype("int64").tolist())
    return values


@pytest.fixture(scope="module")
def sample_records(prepared_counties: dict[str, PreparedCounty]) -> pd.DataFrame:
    """A few hundred normalised records, with every field present in some of them."""
    records = next(iter(prepared_counties.values())).normalised.records
    return records.iloc[:300].reset_index(drop=True)


# ----------------------------------------------------------------------------- the spec
def test_spec_round_trips_through_its_dictionary_form() -> None:
    default = TokenSpec()
    assert TokenSpec.from_dict(default.to_dict()) == default
    custom = TokenSpec(
        version="2.1.0",
        name="custom",
        bloom=BloomSpec(bits=512, hash_count=15, qgram=3, flip_probability=1 / 16, salts=("ym",)),
        exact=("dob", "dob_ym", "nhs"),
        blocking=("blk_name",),
    )
    again = TokenSpec.from_dict(custom.to_dict())
    assert again == custom
    assert again.fingerprint == custom.fingerprint


def test_config_file_and_built_in_default_agree() -> None:
    from_file = TokenSpec.from_toml(TOKEN_SPEC_TOML)
    assert from_file == TokenSpec()
    assert from_file.fingerprint == TokenSpec().fingerprint


def test_fingerprint_is_stable() -> None:
    assert TokenSpec().fingerprint == TokenSpec().fingerprint
    assert len(TokenSpec().fingerprint) == 16


def _changed(field: str) -> dict[str, Any]:
    """A change to one field of the default spec (relative to the default, whatever it is)."""
    default = TokenSpec()
    bloom = default.bloom
    changes: dict[str, Any] = {
        "version": {"version": default.version + ".1"},
        "name": {"name": default.name + "-other"},
        "bits": {"bloom": dataclasses.replace(bloom, bits=bloom.bits + 64)},
        "hash_count": {"bloom": dataclasses.replace(bloom, hash_count=bloom.hash_count % 64 + 1)},
        "qgram": {"bloom": dataclasses.replace(bloom, qgram=bloom.qgram % 4 + 1)},
        "flip_probability": {
            "bloom": dataclasses.replace(
                bloom, flip_probability=1 / 1024 if bloom.flip_probability == 0.5 else 0.5
            )
        },
        "no_flips": {"bloom": dataclasses.replace(bloom, flip_probability=0)},
        "salts": {"bloom": dataclasses.replace(bloom, salts=bloom.salts[:1])},
        "no_salts": {"bloom": dataclasses.replace(bloom, salts=())},
        "frequency_classes": {"frequency_classes": not default.frequency_classes},
        "exact": {"exact": tuple(t for t in default.exact if t != "postcode")},
        "exact_order": {"exact": default.exact[::-1]},
        "blocking": {"blocking": default.blocking[1:]},
    }
    return changes[field]


@pytest.mark.parametrize(
    "field",
    [
        "version",
        "name",
        "bits",
        "hash_count",
        "qgram",
        "flip_probability",
        "no_flips",
        "salts",
        "no_salts",
        "frequency_classes",
        "exact",
        "exact_order",
        "blocking",
    ],
)
def test_fingerprint_changes_when_any_field_changes(field: str) -> None:
    changed = dataclasses.replace(TokenSpec(), **_changed(field))
    assert changed != TokenSpec()
    assert changed.fingerprint != TokenSpec().fingerprint


def test_invalid_spec_lists_every_problem() -> None:
    with pytest.raises(TokenSpecError) as caught:
        TokenSpec(
            bloom=BloomSpec(bits=100, flip_probability=0.3),
            exact=("dob", "shoe_size"),
            blocking=("blk_name", "blk_eye_colour"),
        )
    message = str(caught.value)
    assert "bloom.bits" in message
    assert "flip_probability" in message
    assert "'shoe_size'" in message
    assert "'blk_eye_colour'" in message


@pytest.mark.parametrize(
    "bloom",
    [
        BloomSpec(bits=100),
        BloomSpec(bits=0),
        BloomSpec(bits=8192),
        BloomSpec(hash_count=0),
        BloomSpec(qgram=5),
        BloomSpec(flip_probability=0.3),
        BloomSpec(flip_probability=2**-11),
    ],
)
def test_invalid_bloom_shape_is_refused(bloom: BloomSpec) -> None:
    with pytest.raises(TokenSpecError, match="bloom"):
        TokenSpec(bloom=bloom)


@pytest.mark.parametrize("flip", [0, 1 / 2, 1 / 32, 2**-10])
def test_valid_flip_probabilities_are_accepted(flip: float) -> None:
    assert TokenSpec(bloom=BloomSpec(flip_probability=flip)).bloom.flip_probability == flip


def test_invalid_spec_in_dictionary_form_is_refused() -> None:
    data = TokenSpec().to_dict()
    data["bloom"]["bits"] = 100
    data["tokens"]["exact"] = ["dob", "shoe_size"]
    with pytest.raises(TokenSpecError) as caught:
        TokenSpec.from_dict(data)
    assert "bloom.bits" in str(caught.value)
    assert "shoe_size" in str(caught.value)
    with pytest.raises(TokenSpecError):
        TokenSpec.from_dict({"name": "no version"})


def test_unreadable_spec_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TokenSpecError, match="cannot read"):
        TokenSpec.from_toml(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("version = \n")
    with pytest.raises(TokenSpecError, match="cannot read"):
        TokenSpec.from_toml(broken)


def test_token_columns_follow_the_spec() -> None:
    spec = TokenSpec(
        bloom=BloomSpec(bits=128, salts=()),
        exact=("dob",),
        blocking=("blk_gi",),
        frequency_classes=True,
    )
    assert spec.token_columns() == [
        "dob",
        "blk_gi",
        *(f"{f}_bf_{i}" for f in BLOOM_FIELDS for i in ("0", "1", "n")),
        *FREQUENCY_COLUMNS,
    ]
    salted = TokenSpec(
        bloom=BloomSpec(bits=128, salts=("ym", "dmu")),
        exact=("dob", "dob_ym", "dob_dmu"),
        blocking=("dobu_gi",),
    )
    assert salted.token_columns() == [
        "dob",
        "dob_ym",
        "dob_dmu",
        "dobu_gi",
        *(f"{f}_{s}_bf_{i}" for f in BLOOM_FIELDS for s in ("ym", "dmu") for i in ("0", "1", "n")),
    ]


def test_default_spec_publishes_no_token_of_a_name_alone() -> None:
    # Frequency alignment re-identifies names from an initial, a phonetic code or a
    # frequency class (THREAT_MODEL.md): names are only published combined with the date of
    # birth, and every name filter is salted by it (no unsalted ``given_bf_0``).
    columns = TokenSpec().token_columns()
    assert not {"blk_name", "blk_gi", "blk_fi", *FREQUENCY_COLUMNS} & set(columns)
    assert TokenSpec().bloom.salts
    assert not [c for c in columns for f in BLOOM_FIELDS if c.startswith(f"{f}_bf_")]


def test_a_salt_needs_the_token_that_tells_it() -> None:
    with pytest.raises(TokenSpecError, match="dob_dmu"):
        TokenSpec(bloom=BloomSpec(salts=("dmu",)), exact=("dob",))
    with pytest.raises(TokenSpecError, match="dob_ym"):
        TokenSpec(bloom=BloomSpec(salts=("ym",)), exact=("dob", "dob_dmu"))
    with pytest.raises(TokenSpecError, match="salt"):
        TokenSpec(bloom=BloomSpec(salts=("ym", "shoe_size")))


# ----------------------------------------------------------------------------- secrets
@pytest.mark.parametrize(
    "secret",
    [
        b"",
        bytes(range(31)),  # one byte short
        b"\x00" * 32,
        b"changeme" * 4,
        b"secret" * 8,
        b"x" * 64,
    ],
    ids=["empty", "31-bytes", "zeros", "changeme", "secret-repeated", "one-letter"],
)
def test_short_or_placeholder_secret_is_refused(secret: bytes) -> None:
    with pytest.raises(SecretError):
        TokenSpec().bind(secret)


def test_key_epoch_must_be_positive(test_secret: bytes) -> None:
    with pytest.raises(SecretError):
        TokenSpec().bind(test_secret, epoch=0)


def _held_values(obj: object) -> list[object]:
    """Every leaf value of an object's attributes (dicts, lists, tuples and sets opened)."""
    if isinstance(obj, dict):
        return [v for item in obj.values() for v in _held_values(item)]
    if isinstance(obj, (list, tuple, set)):
        return [v for item in obj for v in _held_values(item)]
    return [obj]


def test_repr_shows_no_key_material(tokeniser: Tokeniser, test_secret: bytes) -> None:
    shown = repr(tokeniser) + str(tokeniser) + f"{tokeniser!r:>10}"
    keys = [v for v in _held_values(vars(tokeniser)) if isinstance(v, bytes)]
    assert len(keys) >= len(tokeniser.spec.exact)  # the derived keys are in there
    for material in (test_secret, *keys):
        assert material.hex() not in shown
        assert material.hex()[:8] not in shown
        assert repr(material) not in shown
        assert repr(material)[2:10] not in shown


def test_tokeniser_does_not_keep_the_secret(tokeniser: Tokeniser, test_secret: bytes) -> None:
    held = [v for v in _held_values(vars(tokeniser)) if isinstance(v, bytes)]
    assert held
    assert all(test_secret not in v for v in held)


# ----------------------------------------------------------------------------- tokens
def test_output_shape_and_types(tokeniser: Tokeniser, sample_records: pd.DataFrame) -> None:
    tokens = tokeniser.tokenise(sample_records, seed=1)
    assert sorted(tokens.columns) == sorted(tokeniser.spec.token_columns())
    assert len(tokens) == len(sample_records)
    assert isinstance(tokens.index, pd.RangeIndex)
    for column in tokens.columns:
        expected = "Int16" if column.endswith(("_bf_n", "_fc")) else "Int64"
        assert str(tokens[column].dtype) == expected, column


def test_output_columns_come_in_the_spec_order(
    tokeniser: Tokeniser, sample_records: pd.DataFrame
) -> None:
    tokens = tokeniser.tokenise(sample_records, seed=1)
    assert list(tokens.columns) == tokeniser.spec.token_columns()


def test_frequency_classes_band_names_by_their_share(test_secret: bytes) -> None:
    tokeniser = TokenSpec(frequency_classes=True).bind(test_secret)
    # 16 records: "smith" 8 times (share 1/2 -> class 1), "jones" 4 (1/4 -> 2), "khan" once
    # (1/16 -> 4); a missing name has no class and does not count.
    names = ["smith"] * 8 + ["jones"] * 4 + ["patel"] * 2 + ["okafor", "khan", None]
    tokens = tokeniser.tokenise(pd.DataFrame({"family_name": names}), seed=1)
    classes = tokens["family_fc"]
    assert list(classes[:8]) == [1] * 8
    assert list(classes[8:12]) == [2] * 4
    assert list(classes[12:16]) == [3, 3, 4, 4]
    assert pd.isna(classes[16])
    assert tokens["given_fc"].isna().all()


def test_many_batches_in_chunks_on_threads_give_each_batch_its_own_tokens(
    tokeniser: Tokeniser,
    test_secret: bytes,
    sample_records: pd.DataFrame,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch's tokens depend only on the batch and its seed: not on the batches tokenised
    beside it, the number of threads, or (its deterministic tokens) the chunks it is cut into."""
    import linkage.tokenise as tokenise_module

    first, second = sample_records.iloc[:200], sample_records.iloc[200:].reset_index(drop=True)
    unchunked = [tokeniser.tokenise(first, seed=3), tokeniser.tokenise(second, seed=4)]
    together = tokeniser.tokenise_many([first, second], seeds=[3, 4], workers=2)
    assert all(a.equals(b) for a, b in zip(together, unchunked, strict=True))

    monkeypatch.setattr(tokenise_module, "CHUNK_ROWS", 64)  # 200 rows: four chunks
    on_two = tokeniser.tokenise_many([first, second], seeds=[3, 4], workers=2)
    on_one = tokeniser.tokenise_many([first], seeds=[3], workers=1)
    assert on_two[0].equals(on_one[0])  # the same whatever the threads or the other batch
    assert list(on_two[0].columns) == tokeniser.spec.token_columns()
    assert isinstance(on_two[0].index, pd.RangeIndex) and len(on_two[0]) == len(first)
    exact = deterministic_columns(tokeniser.spec)
    assert on_two[0][exact].equals(unchunked[0][exact])
    # The filters of a chunked batch still carry the spec's flips, each chunk its own draws.
    words = word_columns(tokeniser.spec)
    assert not on_two[0][words].equals(unchunked[0][words])
    unflipped_spec = dataclasses.replace(
        tokeniser.spec, bloom=dataclasses.replace(tokeniser.spec.bloom, flip_probability=0.0)
    )
    unflipped = Tokeniser(unflipped_spec, test_secret).tokenise_many([first], seeds=[3])[0]
    flipped_bits = np.bitwise_count(
        on_two[0][words].to_numpy(dtype=np.int64, na_value=0).view(np.uint64)
        ^ unflipped[words].to_numpy(dtype=np.int64, na_value=0).view(np.uint64)
    ).sum()
    present_bits = on_two[0][words].notna().to_numpy().sum() * 64
    assert abs(flipped_bits / present_bits - tokeniser.spec.bloom.flip_probability) < 0.03
    assert tokeniser.tokenise_many([first], seeds=[3])[0][words].equals(on_two[0][words])

    with pytest.raises(ValueError, match="2 batches but 1 seeds"):
        tokeniser.tokenise_many([first, second], seeds=[3])


def test_a_batch_with_frequency_classes_is_never_cut(
    test_secret: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frequency classes count a name's share of the whole batch, so no chunk may count alone."""
    import linkage.tokenise as tokenise_module

    monkeypatch.setattr(tokenise_module, "CHUNK_ROWS", 4)
    tokeniser = TokenSpec(frequency_classes=True).bind(test_secret)
    names = ["smith"] * 8 + ["jones"] * 8
    [tokens] = tokeniser.tokenise_many([pd.DataFrame({"family_name": names})], workers=2)
    assert set(tokens["family_fc"]) == {1}  # each name is half of the batch


def test_output_contains_no_input_value(tokeniser: Tokeniser, sample_records: pd.DataFrame) -> None:
    tokens = tokeniser.tokenise(sample_records, seed=1)
    # Nothing but integer token columns: no object or string column can smuggle plaintext.
    assert not [c for c in tokens.columns if not pd.api.types.is_integer_dtype(tokens[c])]
    inputs = {
        str(v)
        for column in sample_records.columns
        if column != "row_number"
        for v in sample_records[column].dropna()
    }
    assert any(v.isdigit() and len(v) == 10 for v in inputs)  # NHS numbers are in the input
    shown = {str(v) for column in tokens.columns for v in tokens[column].dropna()}
    assert not inputs & shown


def test_same_record_and_secret_give_the_same_tokens(
    tokeniser: Tokeniser, test_secret: bytes, sample_records: pd.DataFrame
) -> None:
    spec = tokeniser.spec
    first = tokeniser.tokenise(sample_records, seed=1)
    # Another tokeniser bound to the same secret, other bit flips, rows in another order.
    again = spec.bind(test_secret).tokenise(sample_records.iloc[::-1], seed=2).iloc[::-1]
    again = again.reset_index(drop=True)
    columns = deterministic_columns(spec)
    pd.testing.assert_frame_equal(first[columns], again[columns])
    # The Bloom filters depend on the flip seed, and only on it.
    same_seed = spec.bind(test_secret).tokenise(sample_records, seed=1)
    pd.testing.assert_frame_equal(first, same_seed)
    assert not first[word_columns(spec)].equals(again[word_columns(spec)])


def test_tokens_distinguish_values(tokeniser: Tokeniser, sample_records: pd.DataFrame) -> None:
    tokens = tokeniser.tokenise(sample_records, seed=1)
    for column in ("dob", "nhs", "postcode"):
        source = {"dob": "date_of_birth", "nhs": "nhs_number", "postcode": "postcode"}[column]
        present = sample_records[source].notna()
        assert (
            tokens.loc[present, column].nunique() == sample_records.loc[present, source].nunique()
        )


def test_different_secrets_share_no_token(
    tokeniser: Tokeniser, sample_records: pd.DataFrame
) -> None:
    spec = tokeniser.spec
    ours = tokeniser.tokenise(sample_records, seed=1)
    theirs = spec.bind(OTHER_SECRET).tokenise(sample_records, seed=1)
    columns = deterministic_columns(spec) + word_columns(spec)
    for column in columns:
        a, b = token_values(ours, [column]), token_values(theirs, [column])
        assert len(a) > 1, column  # the check below means something
        assert not a & b, column
    assert not token_values(ours, columns) & token_values(theirs, columns)


def test_different_epochs_share_no_token(test_secret: bytes, sample_records: pd.DataFrame) -> None:
    spec = TokenSpec()
    one = spec.bind(test_secret, epoch=1).tokenise(sample_records, seed=1)
    two = spec.bind(test_secret, epoch=2).tokenise(sample_records, seed=1)
    columns = deterministic_columns(spec) + word_columns(spec)
    assert not token_values(one, columns) & token_values(two, columns)


def test_different_token_names_use_different_keys(tokeniser: Tokeniser) -> None:
    # postcode and postcode_district of "cv1" hash the same text: different keys must differ.
    records = pd.DataFrame({"postcode": ["cv1"], "postcode_district": ["cv1"]})
    tokens = tokeniser.tokenise(records, seed=1)
    assert tokens.loc[0, "postcode"] != tokens.loc[0, "postcode_district"]


def test_date_of_birth_tokens_survive_swapped_day_and_month(tokeniser: Tokeniser) -> None:
    records = pd.DataFrame({"date_of_birth": ["2014-03-07", "2014-07-03", "2014-03-08"]})
    tokens = tokeniser.tokenise(records, seed=1)
    assert tokens.loc[0, "dob"] != tokens.loc[1, "dob"]
    assert tokens.loc[0, "dob_unordered"] == tokens.loc[1, "dob_unordered"]
    assert tokens.loc[0, "dob_unordered"] != tokens.loc[2, "dob_unordered"]
    assert tokens.loc[0, "dob_ym"] == tokens.loc[2, "dob_ym"]
    assert tokens.loc[0, "dob_md"] != tokens.loc[2, "dob_md"]


def test_missing_inputs_give_null_tokens(tokeniser: Tokeniser) -> None:
    records = pd.DataFrame(
        {
            "given_canonical": [None, "", "amelia"],
            "family_name": [None, "", None],
            "previous_family_names": [None, "", None],
            "date_of_birth": [None, "", "2015-06-01"],
            "sex": [None, "", None],
            "nhs_number": [None, "", None],
            "postcode": [None, "", None],
            "postcode_district": [None, "", None],
        }
    )
    tokens = tokeniser.tokenise(records, seed=1)
    assert tokens.iloc[:2].isna().all().all()
    present = tokens.iloc[2]
    for column in ("dob", "dob_unordered", "dobu_gi", "given_ym_bf_0", "given_dmu_bf_n"):
        assert pd.notna(present[column]), column
    for column in (
        *("nhs", "sex", "postcode", "name_ym", "dobu_fi"),
        *("family_ym_bf_0", "family_dmu_bf_0", "surnames_dmu_bf_n"),
    ):
        assert pd.isna(present[column]), column


def test_every_spelling_of_missing_gives_null_tokens(tokeniser: Tokeniser) -> None:
    records = pd.DataFrame(
        {
            "given_canonical": pd.Series([pd.NA, "amy"], dtype="string"),
            "family_name": [np.nan, "okafor"],
            "date_of_birth": pd.Series([pd.NA, "2012-05-06"], dtype="string"),
            "nhs_number": [None, "9434765919"],
        }
    )
    tokens = tokeniser.tokenise(records, seed=1)
    assert tokens.iloc[0].isna().all()
    assert (
        tokens.loc[1, ["given_ym_bf_0", "family_dmu_bf_0", "dob", "nhs", "name_ym"]].notna().all()
    )


def test_absent_columns_count_as_missing(tokeniser: Tokeniser) -> None:
    tokens = tokeniser.tokenise(pd.DataFrame({"family_name": ["okafor", None]}), seed=1)
    assert len(tokens) == 2
    # Filters of a record without a date of birth are made under the empty salt.
    assert tokens.loc[0, ["family_ym_bf_0", "surnames_dmu_bf_0"]].notna().all()
    # Combined tokens need every part: no name token without a date of birth.
    assert tokens.loc[0, ["dob", "nhs", "given_ym_bf_0", "name_ym", "dobu_fi"]].isna().all()
    assert tokens.loc[1].isna().all()


def test_popcounts_match_the_filters(tokeniser: Tokeniser, sample_records: pd.DataFrame) -> None:
    tokens = tokeniser.tokenise(sample_records, seed=1)
    words = tokeniser.spec.bloom.words
    for field in bloom_views(tokeniser.spec.bloom):
        present = tokens[f"{field}_bf_n"].notna()
        bits = bloom_bits(tokens[present], field, words)
        counts = np.bitwise_count(bits).sum(axis=1)
        np.testing.assert_array_equal(counts, tokens.loc[present, f"{field}_bf_n"].to_numpy(int))


# ----------------------------------------------------------------------------- Bloom filters
def _doubled_names(sample_records: pd.DataFrame) -> pd.DataFrame:
    """Every name twice: rows i and i + n hold the same names (and get independent flips)."""
    names = sample_records[["given_canonical", "family_name"]].dropna().reset_index(drop=True)
    return pd.concat([names, names], ignore_index=True)


def test_identical_names_have_similar_but_not_identical_filters(
    tokeniser: Tokeniser, sample_records: pd.DataFrame
) -> None:
    doubled = _doubled_names(sample_records)
    n = len(doubled) // 2
    tokens = tokeniser.tokenise(doubled, seed=3)
    spec = tokeniser.spec
    for field in ("given", "family"):
        bits = bloom_bits(tokens, first_view(spec, field), spec.bloom.words)
        similarity = dice(bits[:n], bits[n:], spec.bloom)
        assert similarity.mean() > 0.8, field
        identical = (bits[:n] == bits[n:]).all(axis=1)
        assert identical.mean() < 0.05, field  # BLIP: equal names do not give equal filters


def test_without_flips_identical_names_have_identical_filters(
    test_secret: bytes, sample_records: pd.DataFrame
) -> None:
    spec = TokenSpec(bloom=BloomSpec(flip_probability=0))
    doubled = _doubled_names(sample_records)
    n = len(doubled) // 2
    tokens = spec.bind(test_secret).tokenise(doubled, seed=3)
    bits = bloom_bits(tokens, first_view(spec, "given"), spec.bloom.words)
    assert (bits[:n] == bits[n:]).all()


def test_unrelated_names_have_low_dice(tokeniser: Tokeniser, sample_records: pd.DataFrame) -> None:
    names = sample_records[["given_canonical", "family_name"]].dropna().reset_index(drop=True)
    tokens = tokeniser.tokenise(names, seed=3)
    spec = tokeniser.spec
    for field, column in (("given", "given_canonical"), ("family", "family_name")):
        bits = bloom_bits(tokens, first_view(spec, field), spec.bloom.words)
        shifted = np.roll(np.arange(len(names)), 7)
        different = (names[column] != names[column].iloc[shifted].to_numpy()).to_numpy()
        similarity = dice(bits[different], bits[shifted][different], spec.bloom)
        assert similarity.mean() < 0.4, field


def test_similar_names_score_between_identical_and_unrelated(test_secret: bytes) -> None:
    # Without flips, so that one pair of each kind is enough to show the order.
    spec = TokenSpec(bloom=dataclasses.replace(BloomSpec(), flip_probability=0))
    records = pd.DataFrame({"family_name": ["thompson", "thomson", "thompson", "okonkwo"]})
    tokens = spec.bind(test_secret).tokenise(records, seed=5)
    bits = bloom_bits(tokens, first_view(spec, "family"), spec.bloom.words)
    same = dice(bits[[0]], bits[[2]])[0]
    typo = dice(bits[[0]], bits[[1]])[0]
    other = dice(bits[[0]], bits[[3]])[0]
    assert same > typo > other


def test_salted_filters_are_comparable_only_under_the_same_salt_value(test_secret: bytes) -> None:
    spec = TokenSpec(bloom=dataclasses.replace(BloomSpec(), flip_probability=0))
    records = pd.DataFrame(
        {
            "given_canonical": ["amelia"] * 4,
            # 0 and 1: same year and month, other day (another decade+month/day salt);
            # 0 and 2: last digit of the year mistyped (same decade+month/day, other year+month);
            # 0 and 3: day and month swapped (same decade+month/day).
            "date_of_birth": ["2014-03-07", "2014-03-08", "2015-03-07", "2014-07-03"],
        }
    )
    tokens = spec.bind(test_secret).tokenise(records, seed=1)
    ym = bloom_bits(tokens, "given_ym", spec.bloom.words)
    dmu = bloom_bits(tokens, "given_dmu", spec.bloom.words)
    assert (ym[0] == ym[1]).all() and (dmu[0] == dmu[2]).all() and (dmu[0] == dmu[3]).all()
    # Under another salt value the same name is a stranger.
    unrelated = [dice(dmu[[0]], dmu[[1]])[0], dice(ym[[0]], ym[[2]])[0], dice(ym[[0]], ym[[3]])[0]]
    assert max(unrelated) < 0.6, unrelated
    assert len(set(tokens["dob_dmu"])) == 2  # tells the matcher which pairs share the salt


def test_combined_blocking_tokens_need_both_parts(tokeniser: Tokeniser) -> None:
    records = pd.DataFrame(
        {
            "given_canonical": ["amelia", "amelia", "amelia", "bella"],
            "family_name": ["okafor", "okafor", "okafor", "okafor"],
            "date_of_birth": ["2014-03-07", "2014-07-03", "2014-03-08", "2014-03-07"],
        }
    )
    tokens = tokeniser.tokenise(records, seed=1)
    # Same date (day and month in either order) and initial: equal; either part changed: not.
    assert tokens.loc[0, "dobu_gi"] == tokens.loc[1, "dobu_gi"]
    assert len({tokens.loc[i, "dobu_gi"] for i in (0, 2, 3)}) == 3
    assert tokens.loc[0, "dobu_fi"] == tokens.loc[3, "dobu_fi"]
    # Phonetic names with year and month: equal across the day; not with another name.
    assert tokens.loc[0, "name_ym"] == tokens.loc[2, "name_ym"]
    assert tokens.loc[0, "name_ym"] != tokens.loc[3, "name_ym"]
    assert tokens.loc[0, "name_md"] != tokens.loc[2, "name_md"]


def test_a_values_token_does_not_depend_on_its_batch() -> None:
    """Deterministic tokens are computed per batch of distinct values, by a fast path when the
    batch is plain ASCII; a value must get the same token whichever path its batch takes."""
    from linkage.tokenise import _keyed64_many

    key, aes_key = bytes(range(32)), bytes(range(1, 33))
    values = ["abc", "abc\x00", "x" * 15, "x" * 16, "1990|05|12|J", "Zoë"]
    together = _keyed64_many(values, key, aes_key)
    alone = [int(_keyed64_many([v], key, aes_key)[0]) for v in values]
    assert together.tolist() == alone
    ascii_only = _keyed64_many(values[:5], key, aes_key)
    assert ascii_only.tolist() == alone[:5]
    assert len(set(alone)) == len(values)  # a trailing NUL is part of the value
