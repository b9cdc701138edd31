"""Shared fixtures: a small synthetic federation on disk and a tokeniser with a fixed test secret.

Everything here is session-scoped and treated as read-only by the tests: generating, writing and
tokenising the federation takes about a second, and the tests that link it (pipeline, CLI,
privacy) each run the matcher once on it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from linkage.pipeline import PreparedCounty, prepare_county
from linkage.records import read_county_file
from linkage.synthetic import SyntheticFederation, generate_federation, write_federation
from linkage.tokenise import Tokeniser, TokenSpec

# In CI, Hypothesis draws the same examples on every run, so a release is never blocked by an
# input that happened to be drawn only that time; local runs keep exploring new ones. (Recent
# Hypothesis has a built-in "ci" profile much like this; this one also holds on older ones.)
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
if os.environ.get("CI"):
    settings.load_profile("ci")

#: Seed of the small synthetic federation every linkage test uses.
FEDERATION_SEED = 11
#: Seed for tokenisation bit flips. ``link_files(..., seed=LINK_SEED)`` tokenises the i-th
#: county with ``LINK_SEED + i``, as :func:`prepared_counties` does, so both give equal tokens.
LINK_SEED = 1
#: A fixed 32-byte federation secret for tests (not a placeholder: 32 distinct bytes).
TEST_SECRET = hashlib.sha256(b"jigsaw test federation secret").digest()


@dataclass(frozen=True)
class FederationFiles:
    """The small federation as written to disk.

    Attributes:
        directory: Folder holding one CSV per county (and nothing else).
        paths: The county files, in the federation's county order.
        truth_path: Ground truth CSV, outside ``directory``.
    """

    directory: Path
    paths: list[Path]
    truth_path: Path


@pytest.fixture(scope="session")
def test_secret() -> bytes:
    """The fixed 32-byte federation secret of the tests."""
    return TEST_SECRET


@pytest.fixture(scope="session")
def link_seed() -> int:
    """Seed to pass to ``link_files`` for tokens equal to :func:`prepared_counties`' tokens."""
    return LINK_SEED


@pytest.fixture(scope="session")
def small_federation() -> SyntheticFederation:
    """Three counties, about 3,000 records in all, with ground truth."""
    return generate_federation(counties=3, records=3000, seed=FEDERATION_SEED)


@pytest.fixture(scope="session")
def federation_files(
    small_federation: SyntheticFederation, tmp_path_factory: pytest.TempPathFactory
) -> FederationFiles:
    """The small federation written as CSV files to a session temporary folder."""
    root = tmp_path_factory.mktemp("small_federation")
    directory = root / "counties"
    truth_path = root / "truth.csv"
    paths = write_federation(small_federation, directory, truth_path=truth_path)
    return FederationFiles(directory=directory, paths=paths, truth_path=truth_path)


@pytest.fixture(scope="session")
def tokeniser(test_secret: bytes) -> Tokeniser:
    """The default token spec bound to the test secret."""
    return TokenSpec().bind(test_secret)


@pytest.fixture(scope="session")
def prepared_counties(
    federation_files: FederationFiles, tokeniser: Tokeniser
) -> dict[str, PreparedCounty]:
    """Each county read from disk and prepared as its node would.

    The tokens equal those that ``link_files(federation_files.paths, tokeniser, seed=LINK_SEED)``
    makes (the pseudonyms, which are random, differ).
    """
    return {
        path.stem: prepare_county(path.stem, read_county_file(path), tokeniser, seed=LINK_SEED + i)
        for i, path in enumerate(federation_files.paths)
    }
