"""Keyed tokens: what a node publishes instead of a person's identifiers.

A :class:`TokenSpec` is data (versioned, hashed, loaded from ``configs/token_spec.toml``); a
:class:`Tokeniser` exists only once a federation secret is bound to a spec. Keys are derived
from the secret with HKDF-SHA256, one key per token name and per key epoch, so tokens of
different fields cannot be joined to each other and a new epoch shares no token with the last.

Two kinds of token come out:

* **Deterministic tokens**: 64-bit keyed BLAKE2b of one normalised field or of a combination
  (date of birth with day and month unordered; phonetic given name with birth year, ...). Equal
  inputs give equal tokens under one key; without the key they cannot be dictionary-attacked.
* **Bloom filters** of name bigrams (Schnell et al. 2009) with keyed positions (a keyed hash
  per bigram, not double hashing), compared by Dice at the matcher. Hardened by random bit
  flips (BLIP), so that equal names do not give equal filters and pattern frequencies leak
  little. Filters are stored as ``bits/64`` signed 64-bit words plus their popcount, the
  layout that both DuckDB and Spark SQL compare fastest.

Everything is vectorised over distinct values: a county's case load has far fewer distinct
names and dates than rows, so each distinct value is hashed once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jellyfish
import numpy as np
import pandas as pd
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from linkage.errors import SecretError, TokenSpecError

__all__ = [
    "BLOOM_FIELDS",
    "KNOWN_BLOCKING",
    "KNOWN_EXACT",
    "SALTS",
    "BloomSpec",
    "TokenSpec",
    "Tokeniser",
    "bloom_columns",
    "bloom_views",
    "new_pseudonyms",
]

MIN_SECRET_BYTES = 32
#: Most rows in one chunk of a batch: only a larger batch is cut, to run on several threads.
#: Chunks repeat the work done once per distinct value (hashing each date of birth, each
#: name's q-grams), so smaller chunks cost more than the threads win back: 1M records in six
#: counties on 2 threads took 13.4 s in chunks of 65,536 rows and 11.1 s uncut.
CHUNK_ROWS = 250_000

#: Bloom-filtered name fields and the normalised text each encodes.
BLOOM_FIELDS: tuple[str, ...] = ("given", "family", "surnames")

_KNOWN_EXACT = (
    "dob",
    "dob_unordered",
    "dob_ym",
    "dob_yd",
    "dob_md",
    "nhs",
    "sex",
    "postcode",
    "postcode_district",
    "dob_dmu",
)
#: Blocking tokens. Each of the first five is a name key *combined with* a date-of-birth key,
#: exactly the conjunctions the blocking rules join on (``linkage/model.py``), so no published
#: token depends on a name alone: ``dobu_gi`` is the date of birth (day and month unordered)
#: with the given name's initial, ``dobu_fi`` the same with the family name's initial, and
#: ``name_ym``/``name_yd``/``name_md`` the phonetic given and family names with two of the
#: three parts of the date of birth. The last three are the name-only tokens of spec 1.x,
#: kept for comparison (``scripts/attack_tokens.py``): frequency alignment re-identifies
#: names from them.
_KNOWN_BLOCKING = (
    "dobu_gi",
    "dobu_fi",
    "name_ym",
    "name_yd",
    "name_md",
    "blk_name",
    "blk_gi",
    "blk_fi",
)
_DEFAULT_BLOCKING = ("dobu_gi", "dobu_fi", "name_ym", "name_yd", "name_md")
#: Every exact and every blocking token a spec may name.
KNOWN_EXACT: tuple[str, ...] = _KNOWN_EXACT
KNOWN_BLOCKING: tuple[str, ...] = _KNOWN_BLOCKING

#: Salts for the Bloom filters: the part of the date of birth whose value keys a filter, so
#: that the same name under another salt value gives an unrelated filter. A filter can only
#: be compared with one made under the same salt value, and the attacker can only pool the
#: filters of one salt value. ``ym``: year and month; ``mdu``: month and day, unordered (it
#: survives a swapped day and month and a mistyped year); ``dmu``: decade of birth with the
#: unordered month and day (survives a swap and a mistyped last digit of the year, in
#: partitions a tenth the size); ``yd``: year and day; ``year``.
SALTS: dict[str, Callable[[str], str]] = {
    "year": lambda d: d[:4],
    "ym": lambda d: d[:7],
    "yd": lambda d: f"{d[:4]}|{d[8:10]}",
    "mdu": lambda d: f"{min(d[5:7], d[8:10])}|{max(d[5:7], d[8:10])}",
    "dmu": lambda d: f"{d[:3]}|{min(d[5:7], d[8:10])}|{max(d[5:7], d[8:10])}",
}

#: The date-of-birth tokens that tell the matcher whether two records share a salt value
#: (``linkage/model.py``); ``dob`` tells two records that both have none.
_SALT_TOKENS = {
    "year": ("dob", "dob_ym", "dob_yd"),
    "ym": ("dob", "dob_ym"),
    "yd": ("dob", "dob_yd"),
    "mdu": ("dob", "dob_md", "dob_unordered"),
    "dmu": ("dob", "dob_dmu"),
}

#: Coarse frequency classes of the given and family name within the county's own records:
#: ``floor(-log2(share))``, capped at 15. They let the model weigh agreement on a common name
#: less than on a rare one (what term-frequency adjustment does in plaintext linkage) while
#: revealing only which of a handful of frequency bands a name falls in.
FREQUENCY_COLUMNS: tuple[str, ...] = ("given_fc", "family_fc")


@dataclass(frozen=True)
class BloomSpec:
    """Shape of the name Bloom filters.

    Attributes:
        bits: Filter length per field; a multiple of 64.
        hash_count: Keyed positions set per q-gram.
        qgram: q-gram length (2 = bigrams), with the name padded by ``_`` at both ends.
        flip_probability: BLIP hardening: the chance each bit is flipped; 0 or 2**-k, k in 1..10.
        salts: One filter per name field and salt (see :data:`SALTS`), keyed by the record's
            salt value; empty for one unsalted filter per field. Two salts that no single
            error in a date of birth changes together (year+month; decade with the unordered
            month and day) keep one pair of filters comparable when a date is mistyped.
    """

    bits: int = 256
    hash_count: int = 10
    qgram: int = 2
    flip_probability: float = 1 / 8
    salts: tuple[str, ...] = ("ym", "dmu")

    def __post_init__(self) -> None:
        # TOML and JSON give lists; keep the spec hashable and comparable.
        object.__setattr__(self, "salts", tuple(self.salts))

    @property
    def words(self) -> int:
        """Number of 64-bit words a filter occupies."""
        return self.bits // 64

    @property
    def views(self) -> tuple[str, ...]:
        """Column prefixes of one name field's filters: ``""`` unsalted, else one per salt."""
        return tuple(f"_{s}" for s in self.salts) or ("",)

    def problems(self) -> list[str]:
        """Every reason this spec is invalid (empty when it is valid)."""
        out = []
        if self.bits <= 0 or self.bits % 64 or self.bits > 4096:
            out.append("bloom.bits must be a positive multiple of 64, at most 4096")
        if not 1 <= self.hash_count <= 32:
            out.append("bloom.hash_count must be between 1 and 32")
        if not 1 <= self.qgram <= 4:
            out.append("bloom.qgram must be between 1 and 4")
        if self.flip_probability != 0 and _flip_exponent(self.flip_probability) is None:
            out.append("bloom.flip_probability must be 0 or a power of two from 1/2 to 1/1024")
        out += [f"unknown bloom salt {s!r}" for s in self.salts if s not in SALTS]
        if len(set(self.salts)) != len(self.salts):
            out.append("bloom.salts must not repeat a salt")
        return out


@dataclass(frozen=True)
class TokenSpec:
    """What tokens a node makes from a record: versioned data, with no key in it.

    Attributes:
        version: Semantic version; part of every key, so a new version never matches an old one.
        name: Human name of the spec.
        bloom: Bloom-filter shape for names.
        exact: Deterministic comparison tokens to publish.
        blocking: Deterministic blocking-key tokens to publish.
        frequency_classes: Publish each name's frequency class within its county
            (``given_fc``, ``family_fc``). Off by default: a frequency class with the name's
            initial is a name-only token, which frequency alignment re-identifies.
    """

    version: str = "2.0.0"
    name: str = "jigsaw-default"
    bloom: BloomSpec = field(default_factory=BloomSpec)
    exact: tuple[str, ...] = _KNOWN_EXACT
    blocking: tuple[str, ...] = _DEFAULT_BLOCKING
    frequency_classes: bool = False

    def __post_init__(self) -> None:
        problems = list(self.bloom.problems())
        problems += [f"unknown exact token {t!r}" for t in self.exact if t not in _KNOWN_EXACT]
        problems += [
            f"unknown blocking token {t!r}" for t in self.blocking if t not in _KNOWN_BLOCKING
        ]
        problems += [
            f"bloom salt {s!r} needs the exact token {t!r} (the matcher compares only filters "
            "made under the same salt value)"
            for s in self.bloom.salts
            for t in _SALT_TOKENS.get(s, ())
            if t not in self.exact
        ]
        if problems:
            raise TokenSpecError("invalid token spec: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenSpec:
        """Build a spec from its dictionary form (as in ``configs/token_spec.toml``)."""
        try:
            bloom = BloomSpec(**dict(data.get("bloom", {})))
            tokens = dict(data.get("tokens", {}))
            return cls(
                version=str(data["version"]),
                name=str(data.get("name", "jigsaw")),
                bloom=bloom,
                exact=tuple(tokens.get("exact", _KNOWN_EXACT)),
                blocking=tuple(tokens.get("blocking", _DEFAULT_BLOCKING)),
                frequency_classes=bool(tokens.get("frequency_classes", False)),
            )
        except (KeyError, TypeError) as e:
            raise TokenSpecError(f"invalid token spec: {e}") from e

    @classmethod
    def from_toml(cls, path: Path) -> TokenSpec:
        """Load a spec from a TOML file.

        Raises:
            TokenSpecError: The file is missing, not TOML, or not a valid spec.
        """
        try:
            with open(path, "rb") as f:
                return cls.from_dict(tomllib.load(f))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise TokenSpecError(f"cannot read token spec {path}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data, the inverse of :meth:`from_dict`."""
        return {
            "version": self.version,
            "name": self.name,
            "bloom": {**asdict(self.bloom), "salts": list(self.bloom.salts)},
            "tokens": {
                "exact": list(self.exact),
                "blocking": list(self.blocking),
                "frequency_classes": self.frequency_classes,
            },
        }

    @property
    def fingerprint(self) -> str:
        """SHA-256 (first 16 hex digits) of the canonical spec; carried in every token batch."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def token_columns(self) -> list[str]:
        """Names of the token columns a tokeniser bound to this spec emits, in order."""
        classes = FREQUENCY_COLUMNS if self.frequency_classes else ()
        return [*self.exact, *self.blocking, *bloom_columns(self.bloom), *classes]

    def bind(self, secret: bytes, *, epoch: int = 1) -> Tokeniser:
        """Bind a federation secret to this spec, giving a tokeniser.

        Raises:
            SecretError: The secret is shorter than 32 bytes or obviously a placeholder.
        """
        return Tokeniser(self, secret, epoch=epoch)


def bloom_views(bloom: BloomSpec) -> list[str]:
    """Prefixes of the filter columns, one per name field and salt: ``given_ym``,
    ``given_mdu``, ... (``given``, ``family``, ``surnames`` when unsalted)."""
    return [f"{f}{v}" for f in BLOOM_FIELDS for v in bloom.views]


def bloom_columns(bloom: BloomSpec) -> list[str]:
    """Column names of the Bloom-filter words and popcounts, e.g. ``given_ym_bf_0``,
    ``given_ym_bf_n`` (``given_bf_0``, ``given_bf_n`` when unsalted)."""
    cols = []
    for f in bloom_views(bloom):
        cols += [f"{f}_bf_{i}" for i in range(bloom.words)]
        cols.append(f"{f}_bf_n")
    return cols


def new_pseudonyms(n: int) -> list[str]:
    """``n`` fresh random pseudonyms (128-bit, hex). They carry no information about a record."""
    raw = np.frombuffer(os.urandom(16 * n), dtype=np.uint8).reshape(n, 16)
    return [bytes(row).hex() for row in raw]


def _flip_exponent(p: float) -> int | None:
    for k in range(1, 11):
        if p == 2.0**-k:
            return k
    return None


class Tokeniser:
    """A token spec bound to a federation secret and key epoch.

    It holds derived keys only; the secret itself is not kept.
    """

    def __init__(self, spec: TokenSpec, secret: bytes, *, epoch: int = 1) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise SecretError(f"the federation secret must be at least {MIN_SECRET_BYTES} bytes")
        if len(set(secret)) < 8:
            raise SecretError("the federation secret looks like a placeholder; generate one")
        if epoch < 1:
            raise SecretError("the key epoch must be a positive integer")
        self.spec = spec
        self.epoch = epoch
        names = [*spec.exact, *spec.blocking, *(f"bloom:{f}" for f in bloom_views(spec.bloom))]
        self._keys = {name: self._derive(secret, name) for name in names}
        self._aes = {name: self._derive(secret, f"{name}/aes") for name in names}

    def _derive(self, secret: bytes, purpose: str) -> bytes:
        info = f"jigsaw/{self.spec.name}/{self.spec.version}/epoch={self.epoch}/{purpose}"
        hkdf = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=b"jigsaw-token-keys/v1", info=info.encode()
        )
        return hkdf.derive(secret)

    def __repr__(self) -> str:  # never show keys
        return f"Tokeniser(spec={self.spec.name}@{self.spec.version}, epoch={self.epoch})"

    def tokenise(self, records: pd.DataFrame, *, seed: int | None = None) -> pd.DataFrame:
        """Tokens for normalised records, one row per input row, in the same order.

        Args:
            records: Normalised records (``linkage.normalise``): uses ``given_canonical``,
                ``family_name``, ``previous_family_names``, ``date_of_birth``, ``sex``,
                ``nhs_number``, ``postcode`` and ``postcode_district``; absent columns count
                as missing values.
            seed: Seed for the BLIP bit flips (tests and benchmarks); ``None`` draws it from
                the operating system, which is what deployments want.

        Returns:
            A frame with one nullable ``Int64`` column per deterministic token and per
            Bloom-filter word, and ``Int16`` popcounts; a missing input gives a null token.
            No column holds plaintext.
        """
        [tokens] = self.tokenise_many([records], seeds=[seed])
        return tokens

    def tokenise_many(
        self,
        batches: Sequence[pd.DataFrame],
        *,
        seeds: Sequence[int | None] | None = None,
        workers: int | None = None,
    ) -> list[pd.DataFrame]:
        """:meth:`tokenise` for several batches (one county's export each, say) on all cores.

        The batches, and chunks of :data:`CHUNK_ROWS` rows of any longer batch, run on a pool
        of threads (the hashing, AES and much of the numpy work release the GIL). A batch's
        tokens depend only on the batch and its seed, never on the other batches or the
        number of threads: a batch of one chunk draws its bit flips from ``seed`` as
        :meth:`tokenise` always has, a longer one gives each chunk its own stream spawned
        from ``seed``.

        Args:
            batches: Normalised record frames.
            seeds: One flip seed per batch (``None``: from the operating system).
            workers: Threads to use (default: one per CPU).
        """
        seeds = list(seeds) if seeds is not None else [None] * len(batches)
        if len(seeds) != len(batches):
            raise ValueError(f"{len(batches)} batches but {len(seeds)} seeds")
        jobs: list[tuple[int, pd.DataFrame, np.random.Generator]] = []
        for b, (records, seed) in enumerate(zip(batches, seeds, strict=True)):
            # Frequency classes are counted over the whole batch, so such a batch is one chunk.
            chunks = 1 if self.spec.frequency_classes else max(1, -(-len(records) // CHUNK_ROWS))
            if chunks == 1:
                rngs = [np.random.default_rng(seed)]
            else:
                streams = np.random.SeedSequence(seed).spawn(chunks)
                rngs = [np.random.default_rng(s) for s in streams]
            for c, rng in enumerate(rngs):
                part = (
                    records if chunks == 1 else records.iloc[c * CHUNK_ROWS : (c + 1) * CHUNK_ROWS]
                )
                jobs.append((b, part, rng))
        threads = min(workers or _usable_cpus(), len(jobs))
        if threads <= 1:
            done = [self._tokenise_chunk(part, rng) for _, part, rng in jobs]
        else:
            with ThreadPoolExecutor(threads, thread_name_prefix="tokenise") as pool:
                done = list(pool.map(lambda job: self._tokenise_chunk(job[1], job[2]), jobs))
        out: list[list[pd.DataFrame]] = [[] for _ in batches]
        for (b, _, _), tokens in zip(jobs, done, strict=True):
            out[b].append(tokens)
        return [
            parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True) for parts in out
        ]

    def _tokenise_chunk(self, records: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
        n = len(records)
        # Every token is a function of a few distinct values: factorise each input column
        # once, derive on the distinct values, and hash each distinct value once.
        given = _Factor.of(records, "given_canonical")
        family = _Factor.of(records, "family_name")
        dob = _Factor.of(records, "date_of_birth")
        sources: dict[str, Callable[[], _Factor]] = {
            "dob": lambda: dob,
            "dob_unordered": lambda: dob.derive(
                lambda d: f"{d[:4]}|{min(d[5:7], d[8:10])}|{max(d[5:7], d[8:10])}"
            ),
            "dob_ym": lambda: dob.derive(lambda d: f"{d[:4]}|{d[5:7]}"),
            "dob_yd": lambda: dob.derive(lambda d: f"{d[:4]}|{d[8:10]}"),
            "dob_md": lambda: dob.derive(lambda d: f"{d[5:7]}|{d[8:10]}"),
            "dob_dmu": lambda: source("salt:dmu"),
            "nhs": lambda: _Factor.of(records, "nhs_number"),
            "sex": lambda: _Factor.of(records, "sex"),
            "postcode": lambda: _Factor.of(records, "postcode"),
            "postcode_district": lambda: _Factor.of(records, "postcode_district"),
            "blk_name": lambda: given.derive(_first_word_phonetic).join(
                family.derive(_first_word_phonetic)
            ),
            "blk_gi": lambda: given.derive(lambda g: g[:1]),
            "blk_fi": lambda: family.derive(lambda f: f[:1]),
            **{f"salt:{s}": _deriving(dob, fn) for s, fn in SALTS.items()},
            "dobu_gi": lambda: source("dob_unordered").join(given.derive(lambda g: g[:1])),
            "dobu_fi": lambda: source("dob_unordered").join(family.derive(lambda f: f[:1])),
            "name_ym": lambda: source("blk_name").join(source("dob_ym")),
            "name_yd": lambda: source("blk_name").join(source("dob_yd")),
            "name_md": lambda: source("blk_name").join(source("dob_md")),
        }
        out: dict[str, Any] = {}
        made: dict[str, _Factor] = {}

        def source(name: str) -> _Factor:
            if name not in made:
                made[name] = sources[name]()
            return made[name]

        for name in (*self.spec.exact, *self.spec.blocking):
            out[name] = source(name).tokens(self._keys[name], self._aes[name])

        previous = _Factor.of(records, "previous_family_names")
        surnames = family.combine(
            previous, lambda f, p: f"{f} {p.replace(';', ' ')}".strip(), either=True
        )
        if self.spec.frequency_classes:
            out["given_fc"] = given.frequency_classes()
            out["family_fc"] = family.frequency_classes()
        texts = {"given": given, "family": family, "surnames": surnames}
        for f in BLOOM_FIELDS:
            grams = _Grams.of(texts[f].uniques, self.spec.bloom.qgram)  # shared by the salts
            for view in self.spec.bloom.views:
                # The salt value prefixes every q-gram (a prefix-free "salt\0gram"), so each
                # salt value keys its own filters. Records without a date of birth share the
                # empty salt: comparable only with each other.
                salt = source(f"salt:{view[1:]}") if view else None
                name = f"bloom:{f}{view}"
                words, counts, missing = self._bloom(
                    texts[f], grams, salt, self._keys[name], self._aes[name], rng
                )
                for i in range(self.spec.bloom.words):
                    out[f"{f}{view}_bf_{i}"] = pd.arrays.IntegerArray(words[:, i].copy(), missing)
                out[f"{f}{view}_bf_n"] = pd.arrays.IntegerArray(counts, missing)
        return pd.DataFrame({c: out[c] for c in self.spec.token_columns()}, index=pd.RangeIndex(n))

    def _bloom(
        self,
        texts: _Factor,
        grams: _Grams,
        salt: _Factor | None,
        key: bytes,
        aes_key: bytes,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each record's filter words (flipped), popcounts and missing mask.

        Vectorised over records: the q-grams of each distinct name are listed once, each
        record's (salt, name) combination is an integer, each distinct salted q-gram is hashed
        once, and a combination's filter is the OR of its q-grams' filters. (With a salt almost
        every record is its own combination, so nothing here may loop over records in Python.)
        """
        spec = self.spec.bloom
        vocabulary, gram_ids, lengths = grams.vocabulary, grams.ids, grams.lengths
        starts = np.cumsum(lengths) - lengths
        # Each record's (salt, text) combination; a missing salt is a salt value of its own.
        present = texts.codes >= 0
        n_texts = max(len(texts.uniques), 1)
        if salt is None:
            salt_codes = np.zeros(len(texts.codes), dtype=np.int64)
            prefixes = [""]
        else:
            salt_codes = np.where(salt.codes >= 0, salt.codes, len(salt.uniques))
            prefixes = [f"{value}\0" for value in [*salt.uniques, ""]]
        pair = salt_codes[present].astype(np.int64) * n_texts + texts.codes[present]
        combos, inverse = np.unique(pair, return_inverse=True)
        combo_salt, combo_text = np.divmod(combos, n_texts)
        # The salted q-grams of each combination, as one flat array.
        per = lengths[combo_text]
        first = np.cumsum(per) - per
        flat = (
            np.arange(int(per.sum())) - np.repeat(first, per) + np.repeat(starts[combo_text], per)
        )
        salted = np.repeat(combo_salt, per) * len(vocabulary) + gram_ids[flat]
        distinct, which = np.unique(salted, return_inverse=True)
        salt_of, gram_of = np.divmod(distinct, max(len(vocabulary), 1))
        positions = _gram_positions(  # (distinct salted grams, hash_count)
            [p.encode() for p in prefixes],
            grams.encoded,
            salt_of,
            gram_of,
            key,
            aes_key,
            spec,
        )
        masks = np.zeros((len(distinct), spec.words), dtype=np.uint64)
        if len(distinct):
            rows = np.repeat(np.arange(len(distinct)), spec.hash_count)
            bit = positions.reshape(-1).astype(np.uint64)
            np.bitwise_or.at(
                masks,
                (rows, (bit // np.uint64(64)).astype(np.intp)),
                np.left_shift(np.uint64(1), bit % np.uint64(64)),
            )
        table = np.zeros((len(combos) + 1, spec.words), dtype=np.uint64)  # last row: missing
        if len(combos):
            table[:-1] = np.bitwise_or.reduceat(masks[which], first, axis=0)
        record_combo = np.full(len(texts.codes), len(combos), dtype=np.intp)
        record_combo[present] = inverse.reshape(-1)
        words = table[record_combo]
        k = _flip_exponent(spec.flip_probability) if spec.flip_probability else None
        if k is not None:
            # A bit set in k independent uniform words is set with probability 2**-k.
            flips = rng.integers(0, 2**64, size=words.shape, dtype=np.uint64)
            for _ in range(k - 1):
                flips &= rng.integers(0, 2**64, size=words.shape, dtype=np.uint64)
            words ^= flips
        counts = np.bitwise_count(words).sum(axis=1, dtype=np.int16)
        return words.view(np.int64), counts, ~present


@dataclass(frozen=True)
class _Grams:
    """The q-grams of a field's distinct texts, as ids into a vocabulary of q-grams.

    Attributes:
        vocabulary: The distinct q-grams, in order of first appearance.
        encoded: The same, as UTF-8 bytes.
        ids: Every text's q-grams, one after another, as vocabulary ids.
        lengths: How many q-grams each text has.
    """

    vocabulary: list[str]
    encoded: list[bytes]
    ids: np.ndarray
    lengths: np.ndarray

    @classmethod
    def of(cls, texts: list[str], q: int) -> _Grams:
        vocabulary: dict[str, int] = {}
        lengths = np.zeros(len(texts), dtype=np.intp)
        ids: list[int] = []
        for t, text in enumerate(texts):
            grams = _qgrams(text, q)
            lengths[t] = len(grams)
            ids.extend([vocabulary.setdefault(g, len(vocabulary)) for g in grams])
        words = list(vocabulary)
        return cls(words, [g.encode() for g in words], np.asarray(ids, dtype=np.int64), lengths)


class _Factor:
    """A column as integer codes into its distinct values (code -1: missing)."""

    def __init__(self, codes: np.ndarray, uniques: list[str]) -> None:
        self.codes = codes
        self.uniques = uniques

    @classmethod
    def of(cls, records: pd.DataFrame, name: str) -> _Factor:
        """Factorise a normalised text column; absent columns and empty strings are missing."""
        if name not in records:
            return cls(np.full(len(records), -1, dtype=np.intp), [])
        column = records[name]
        codes, uniques = pd.factorize(column.to_numpy(dtype=object), use_na_sentinel=True)
        values = [str(u) for u in uniques]
        if "" in values:  # an empty string is a missing value
            empty = values.index("")
            codes = np.where(codes == empty, -1, codes - (codes > empty))
            values.pop(empty)
        return cls(np.asarray(codes), values)

    def derive(self, fn: Callable[[str], str | None]) -> _Factor:
        """Apply ``fn`` to each distinct value (``None``/empty results become missing)."""
        return self._remap([fn(u) for u in self.uniques], self.codes)

    def _pairs(self, other: _Factor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The distinct (value, other value) pairs of the rows: indexes into ``[missing,
        *uniques]`` on each side, and each row's pair."""
        stride = len(other.uniques) + 1
        pair = (self.codes + 1) * stride + (other.codes + 1)
        distinct, inverse = np.unique(pair, return_inverse=True)
        i, j = np.divmod(distinct, stride)
        return i, j, inverse.reshape(-1)

    def combine(
        self, other: _Factor, fn: Callable[[str, str], str | None], *, either: bool = False
    ) -> _Factor:
        """Combine two columns value by value; missing if either is (or both, if ``either``)."""
        i, j, rows = self._pairs(other)
        derived: list[str | None] = []
        for a_at, b_at in zip(i.tolist(), j.tolist(), strict=True):
            a = self.uniques[a_at - 1] if a_at else None
            b = other.uniques[b_at - 1] if b_at else None
            if a is not None and b is not None:
                derived.append(fn(a, b))
            elif either and (a is not None or b is not None):
                derived.append(fn(a or "", b or ""))
            else:
                derived.append(None)
        return self._remap(derived, rows)

    def join(self, other: _Factor, sep: str = "|") -> _Factor:
        """Two columns' values joined by ``sep`` (missing if either is), vectorised: the
        blocking tokens are such joins, with about as many distinct values as records."""
        i, j, rows = self._pairs(other)
        both = (i > 0) & (j > 0)
        left = np.array(["", *self.uniques], dtype=object)[i[both]]
        right = np.array(["", *other.uniques], dtype=object)[j[both]]
        derived = np.full(len(i), None, dtype=object)
        derived[both] = left + sep + right  # element-wise str concatenation, in C
        return self._remap(derived, rows)

    @staticmethod
    def _remap(derived: list[str | None] | np.ndarray, codes: np.ndarray) -> _Factor:
        """Codes into ``derived`` (missing: -1) as codes into its distinct non-empty values,
        numbered in order of first appearance."""
        values = np.asarray(derived, dtype=object)
        values[values == ""] = None
        mapping, uniques = pd.factorize(values, use_na_sentinel=True)
        mapping = np.append(mapping, -1)
        return _Factor(mapping[codes], [str(u) for u in uniques])

    def frequency_classes(self) -> pd.arrays.IntegerArray:
        """``floor(-log2(share))`` of each row's value among the present values, capped at 15."""
        present = self.codes >= 0
        counts = np.bincount(self.codes[present], minlength=len(self.uniques)).astype(float)
        total = max(float(present.sum()), 1.0)
        with np.errstate(divide="ignore"):
            classes = np.floor(-np.log2(np.maximum(counts, 1.0) / total))
        table = np.append(np.clip(classes, 0, 15).astype(np.int16), np.int16(0))
        return pd.arrays.IntegerArray(table[self.codes], ~present)

    def tokens(self, key: bytes, aes_key: bytes) -> pd.arrays.IntegerArray:
        """Keyed 64-bit tokens of the values, as a nullable integer array."""
        table = np.append(_keyed64_many(self.uniques, key, aes_key), np.int64(0))
        return pd.arrays.IntegerArray(table[self.codes], self.codes < 0)


def _keyed64_many(values: list[str], key: bytes, aes_key: bytes) -> np.ndarray:
    """Keyed 64-bit tokens: AES-256 of short values (a pseudorandom permutation of one padded
    block, computed for a million values in one call), keyed BLAKE2b of longer ones."""
    out = np.empty(len(values), dtype=np.int64)
    if not values:
        return out
    blocks, lengths = _utf8_blocks(values)
    short = np.flatnonzero(lengths < 16)
    if len(short):
        # The value, 0x80, then zeros: an injective padding, so distinct values give
        # distinct blocks.
        block = blocks[short, :16].copy()
        block[np.arange(len(short)), lengths[short]] = 0x80
        encryptor = Cipher(algorithms.AES(aes_key), modes.ECB()).encryptor()
        cipher = encryptor.update(block.tobytes()) + encryptor.finalize()
        out[short] = np.frombuffer(cipher, dtype="<i8")[::2]
    for i in np.flatnonzero(lengths >= 16).tolist():
        out[i] = _keyed64(values[i].encode(), key)
    return out


def _utf8_blocks(values: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Values as zero-padded UTF-8 rows of a uint8 array (at least 16 wide) and their byte
    lengths, converted in C when every value is ASCII (tokens of normalised fields are) and
    has no NUL (numpy's fixed-width strings drop trailing NULs)."""
    joined = "".join(values)
    if joined.isascii() and "\x00" not in joined:
        fixed = np.array(values, dtype=np.str_)
        width = max(fixed.dtype.itemsize // 4, 16)
        lengths = np.strings.str_len(fixed).astype(np.intp)
        raw = fixed.astype(f"S{width}")
    else:
        encoded = [v.encode() for v in values]
        lengths = np.array([len(b) for b in encoded], dtype=np.intp)
        width = max(int(lengths.max()), 16)
        raw = np.array(encoded, dtype=f"S{width}")
    return raw.view(np.uint8).reshape(len(values), width), lengths


def _usable_cpus() -> int:
    """CPUs this process may run on (a container's or taskset's share, not the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _deriving(factor: _Factor, fn: Callable[[str], str | None]) -> Callable[[], _Factor]:
    return lambda: factor.derive(fn)


def _first_word_phonetic(name: str) -> str:
    return str(jellyfish.nysiis(name.split(" ", 1)[0]))


def _keyed64(data: bytes, key: bytes) -> int:
    digest = hashlib.blake2b(data, key=key, digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _qgrams(text: str, q: int) -> Sequence[str]:
    padded = "_" + text + "_"
    return [padded[i : i + q] for i in range(max(1, len(padded) - q + 1))]


def _gram_positions(
    prefixes: list[bytes],
    grams: list[bytes],
    prefix_of: np.ndarray,
    gram_of: np.ndarray,
    key: bytes,
    aes_key: bytes,
    spec: BloomSpec,
) -> np.ndarray:
    """The ``hash_count`` filter positions of each salted q-gram ``prefixes[prefix_of[i]] +
    grams[gram_of[i]]``, as a (q-grams, hash_count) array."""
    # Positions come from one keyed pseudorandom function of the salted q-gram: independent
    # positions, unlike double hashing, whose regular patterns Kroll and Steinmetzer (2015)
    # exploited. With salts nearly every record brings its own salted q-grams, so they are
    # assembled as byte arrays and encrypted in one AES-256 call (counter blocks); one too long
    # for a block is keyed BLAKE2b instead.
    blocks = -(-2 * spec.hash_count // 16)  # 16-bit draws, eight per AES block
    draws = np.empty((len(prefix_of), blocks * 8), dtype="<u2")
    p_len = np.array([len(p) for p in prefixes], dtype=np.intp)[prefix_of]
    g_len = np.array([len(g) for g in grams], dtype=np.intp)[gram_of]
    short = p_len + g_len <= 14
    rows = np.flatnonzero(short)
    if len(rows):
        # A block: the counter byte, the salted q-gram, 0x80, then zeros (injective padding).
        width = 15
        p_bytes = _byte_table(prefixes, width)[prefix_of[rows]]
        g_bytes = _byte_table(grams, width)[gram_of[rows]]
        k = np.arange(width)[None, :]
        lp, lg = p_len[rows][:, None], g_len[rows][:, None]
        from_gram = np.take_along_axis(g_bytes, np.clip(k - lp, 0, width - 1), axis=1)
        body = np.where(k < lp, p_bytes, np.where(k < lp + lg, from_gram, 0))
        body[k == lp + lg] = 0x80
        plain = np.empty((len(rows), blocks, 16), dtype=np.uint8)
        plain[:, :, 0] = np.arange(blocks, dtype=np.uint8)
        plain[:, :, 1:] = body[:, None, :]
        encryptor = Cipher(algorithms.AES(aes_key), modes.ECB()).encryptor()
        cipher = encryptor.update(plain.tobytes()) + encryptor.finalize()
        draws[rows] = np.frombuffer(cipher, dtype="<u2").reshape(len(rows), blocks * 8)
    for i in np.flatnonzero(~short):
        data = prefixes[prefix_of[i]] + grams[gram_of[i]]
        digest = hashlib.blake2b(data, key=key, digest_size=blocks * 16).digest()
        draws[i] = np.frombuffer(digest, dtype="<u2")
    # Filter lengths are powers of two up to 4096 in practice, so ``%`` is exact.
    return (draws[:, : spec.hash_count] % spec.bits).astype(np.int64)


def _byte_table(values: list[bytes], width: int) -> np.ndarray:
    """Values as rows of a (len(values), width) uint8 array, zero-filled (longer: cut)."""
    if not values:
        return np.zeros((1, width), dtype=np.uint8)
    # Fixed-width bytes: numpy pads with zeros (and cuts longer values) in C.
    fixed = np.array([v[:width] for v in values], dtype=f"S{width}")
    return fixed.view(np.uint8).reshape(len(values), width)
