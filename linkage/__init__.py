"""Jigsaw's linkage core: pure domain code, no HTTP and no key files.

The flow, one module per step::

    records (read, map columns) -> normalise -> tokenise (keyed) -> engine/model (Splink)
        -> cluster (people, families) -> evaluate

``pipeline`` strings the steps together in the two halves a federation splits between machines:
``prepare_county`` (a node) and ``match_tokens`` (the matcher). ``synthetic`` makes labelled
test federations.
"""

from linkage.engine import SplinkEngine
from linkage.errors import LinkageError
from linkage.model import LinkageModel, TrainingOptions
from linkage.normalise import normalise_records
from linkage.pipeline import LinkResult, link_files, match_tokens, prepare_county
from linkage.records import ColumnMapping, read_county_file
from linkage.synthetic import generate_federation
from linkage.tokenise import Tokeniser, TokenSpec

__all__ = [
    "ColumnMapping",
    "LinkResult",
    "LinkageError",
    "LinkageModel",
    "SplinkEngine",
    "TokenSpec",
    "Tokeniser",
    "TrainingOptions",
    "generate_federation",
    "link_files",
    "match_tokens",
    "normalise_records",
    "prepare_county",
    "read_county_file",
]
