"""The matcher's half of a key rotation: link on the old epoch until every node has moved.

Rotating the federation secret opens key epoch N+1 (``jigsaw keys rotate``). The matcher never
sees a secret; it sees epochs, in each token batch's ``token_spec.epoch``:

* While it is at epoch N it takes batches of N (stored in ``tokens``, scored as usual) and of
  N+1 (kept apart in ``tokens_next``, not scored: tokens of two epochs never compare equal).
  Tombstones apply whatever their epoch. Batches of other epochs are refused (HTTP 422).
* A node that has re-tokenised every record under N+1 marks its last batch ``epoch_complete``.
  When every registered node that holds tokens of epoch N has done so, the scorer switches
  (:meth:`KeyEpochs.switch_if_due`): in one transaction the old epoch's tokens are deleted and
  the new epoch's become the index; the cached scoring linker is dropped; the switch is
  audited; then a full link on the new tokens (with the model as it is) replaces pairs,
  clusters and families. Records keep their cluster ids across it, so an alert whose cluster
  is unchanged is not sent again, and none is withdrawn for want of the old tokens.
* After the switch, batches of epoch N are refused.

A node that holds no tokens (registered but never published, or everything withdrawn) is not
waited for: it has nothing to re-tokenise, and its first batch must be of the new epoch.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from federation.audit import AuditLog
from federation.matcher.index import LinkIndex
from federation.matcher.store import MatcherStore
from federation.registry import MATCHER_ID, Registry

__all__ = ["KeyEpochs"]

logger = logging.getLogger("jigsaw.matcher")


class KeyEpochs:
    """Tracks a rotation's progress and switches epochs when every node has moved.

    Args:
        store: The matcher's store (its ``audit_log`` table records each switch).
        registry: The federation registry (the nodes that may have to move).
    """

    def __init__(self, store: MatcherStore, registry: Registry) -> None:
        self.store = store
        self.registry = registry
        self.audit = AuditLog(store.conn, lock=store.lock)
        self._check = threading.Event()
        # Look once at start: a completion may have been stored just before a restart.
        self._check.set()

    def completed(self) -> None:
        """A node has sent ``epoch_complete``: look again whether the switch is due."""
        self._check.set()

    def progress(self) -> dict[str, Any]:
        """The current epoch and the next one's progress (for the admin status).

        Returns:
            ``current``, ``next``, ``completed`` (counties done with the next epoch),
            ``waiting_for`` (counties the switch still waits for, while a rotation is under
            way) and ``staged`` (token rows held for the next epoch).
        """
        progress = self.store.epoch_progress()
        holding = progress.pop("holding")
        rotating = bool(progress["completed"] or progress["staged"])
        progress["waiting_for"] = self._waiting(holding, progress["completed"]) if rotating else []
        return progress

    def due(self) -> int | None:
        """The epoch to switch to, if at least one node has completed it and none is awaited."""
        progress = self.store.epoch_progress()
        if progress["current"] is None or not progress["completed"]:
            return None
        if self._waiting(progress["holding"], progress["completed"]):
            return None
        return int(progress["next"])

    def _waiting(self, holding: list[str], completed: list[str]) -> list[str]:
        return sorted(c for c in holding if c in self.registry.nodes and c not in completed)

    def switch_if_due(self, index: LinkIndex) -> dict[str, Any] | None:
        """Switch to the next epoch if it is due (the caller holds the scoring lock).

        Returns:
            A summary of the switch and the full link after it, or None if not due.
        """
        if not self._check.is_set():
            return None
        self._check.clear()
        epoch = self.due()
        if epoch is None:
            return None
        return self.switch(index, epoch)

    def switch(self, index: LinkIndex, epoch: int) -> dict[str, Any] | None:
        """Make ``epoch`` current, delete the old epoch's tokens, and link on the new ones.

        The store checks again, in the switch's own transaction, that it is due (a batch may
        have arrived since :meth:`due` looked); if not, nothing changes and None is returned.
        """
        counts = self.store.switch_epoch(epoch, awaited=list(self.registry.nodes))
        if counts is None:
            return None
        index.forget_index()
        self.audit.append(
            "keys.epoch_switched",
            MATCHER_ID,
            {
                "previous_epoch": epoch - 1,
                "epoch": epoch,
                "deleted_token_rows": counts["deleted"],
                "token_rows": counts["moved"],
            },
        )
        logger.info(
            "switched to key epoch %d: %d token rows of epoch %d deleted, %d of epoch %d indexed",
            epoch,
            counts["deleted"],
            epoch - 1,
            counts["moved"],
            epoch,
        )
        # Without a model yet, the records stay queued for the first link as usual.
        link = index.relink() if index.model is not None else {"status": "waiting"}
        return {"status": "switched", "epoch": epoch, **counts, "link": link}
