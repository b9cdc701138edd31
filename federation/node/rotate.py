"""A node's half of a key rotation: re-tokenise every record under the new key epoch.

When the federation secret is rotated, each county is given the new epoch's secret file and
points its node at it (``secret = ".../federation.2.key"``, whose name states the epoch; or
``JIGSAW_FEDERATION_SECRET`` with ``key_epoch``). At its next start the node sees that its
configured epoch is one above the epoch it last published under, and before it serves:

1. re-tokenises every active record from the normalised values it keeps
   (``records.normalised``), under the pseudonyms the records already have;
2. queues the tokens as upserts, in token batches of the new epoch, the last one marked
   ``epoch_complete`` (one empty batch if the node holds no records);
3. records the new epoch, and each record's content hash under it (so that the next load of
   an unchanged export republishes nothing), in the same transaction; and audits it.

The publisher then sends the batches after anything still queued under the old epoch, in
order, so the matcher has everything before it sees ``epoch_complete``. The matcher keeps
linking on the old epoch until every node holding tokens has completed the new one, then
switches and deletes the old epoch's tokens.

The node refuses to start if the configured epoch is lower than the one it publishes under
(an old secret), or more than one above it (epochs are taken one at a time), or if some
records were stored before normalised values were kept (load the export once under the old
epoch first). Nothing here logs or raises anything derived from the secret or the records.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import pandas as pd

from federation.audit import AuditLog
from federation.errors import ConfigError
from federation.node.ingest import _batches, content_hashes
from federation.node.store import NodeStore
from linkage.tokenise import Tokeniser

__all__ = ["RotationReport", "rotate_if_needed"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RotationReport:
    """What moving to a new key epoch did.

    Attributes:
        previous_epoch: The epoch published under before.
        epoch: The new epoch.
        records: Active records re-tokenised.
        batches: Token batches queued (the last one marked ``epoch_complete``).
        seconds: Time taken.
    """

    previous_epoch: int
    epoch: int
    records: int
    batches: int
    seconds: float


def rotate_if_needed(
    store: NodeStore,
    tokeniser: Tokeniser,
    *,
    county: str,
    batch_size: int,
    seed: int | None = None,
    audit: AuditLog | None = None,
) -> RotationReport | None:
    """Bring the node's store to the tokeniser's key epoch, re-tokenising if it went up.

    A store that has never recorded an epoch (a new node, or one from before key rotation)
    simply starts at the configured epoch.

    Args:
        store: The node's store.
        tokeniser: The federation's token spec bound to the configured secret and epoch.
        county: This node's county id.
        batch_size: Records per token batch.
        seed: Seed for the Bloom-filter bit flips (demos and tests only).
        audit: The node's audit log, for an entry recording the change of epoch.

    Returns:
        What was done, or None if the store was already at (or started at) the epoch.

    Raises:
        ConfigError: The configured epoch is below the store's, or more than one above it,
            or records lack the normalised values re-tokenising needs.
        StoreError: The store fails; nothing is then changed.
    """
    started = time.perf_counter()
    epoch = tokeniser.epoch
    with store.load_lock:  # no load may compare with the records while they are re-tokenised
        current = store.key_epoch()
        if current is None:
            store.start_key_epoch(epoch)
            return None
        if epoch == current:
            return None
        if epoch < current:
            raise ConfigError(
                f"the configured federation secret is for key epoch {epoch}, but this node "
                f"already publishes under epoch {current}: configure the current secret"
            )
        if epoch > current + 1:
            raise ConfigError(
                f"the configured federation secret is for key epoch {epoch}, but this node "
                f"publishes under epoch {current}: move to epoch {current + 1} first "
                "(key epochs are taken one at a time)"
            )
        stored = store.records_to_retokenise()
        missing = int(stored["normalised"].isna().sum()) if len(stored) else 0
        if missing:
            raise ConfigError(
                f"{missing} records were stored before this node kept their normalised values, "
                f"so they cannot be re-tokenised: start the node once more with key epoch "
                f"{current} (the old secret), load the county's export, then rotate again"
            )
        normalised = pd.DataFrame.from_records(
            [json.loads(text) for text in stored["normalised"]], index=range(len(stored))
        ).astype(object)
        # A value missing from some records' JSON (kept by another version) is a missing value.
        normalised = normalised.where(normalised.notna(), None)
        if len(stored):
            tokens = tokeniser.tokenise(normalised, seed=seed)
            role = normalised["role"] if "role" in normalised else pd.Series([None] * len(stored))
            tokens.insert(0, "role", role.astype("string").reset_index(drop=True))
            tokens.insert(0, "household", pd.Series(list(stored["household"]), dtype="string"))
            tokens.insert(0, "pseudonym", pd.Series(list(stored["pseudonym"]), dtype="string"))
        else:
            tokens = pd.DataFrame(
                columns=["pseudonym", "household", "role", *tokeniser.spec.token_columns()]
            )
        messages = _batches(
            tokens,
            [],
            county=county,
            tokeniser=tokeniser,
            batch_size=batch_size,
            epoch_complete=True,
        )
        hashes = pd.DataFrame(
            {
                "record_id": list(stored["record_id"]),
                "content_hash": list(content_hashes(normalised, tokeniser)),
            }
        )
        store.start_key_epoch(epoch, content_hashes=hashes, messages=messages)
    report = RotationReport(
        previous_epoch=current,
        epoch=epoch,
        records=len(stored),
        batches=len(messages),
        seconds=time.perf_counter() - started,
    )
    if audit is not None:
        audit.append(
            "keys.epoch_started",
            county,
            {
                "previous_epoch": current,
                "epoch": epoch,
                "records": report.records,
                "batches": report.batches,
            },
        )
    logger.info(
        "key epoch %d -> %d: %d records re-tokenised, %d token batches queued (%.1f s)",
        current,
        epoch,
        report.records,
        report.batches,
        report.seconds,
    )
    return report
