"""The messages that cross between nodes and the matcher (bodies of signed envelopes).

Each body is a pydantic model, validated on receipt; ``schemas/*.schema.json`` are generated
from these models (``python -m federation.protocol``) and a test keeps them in step.
Every body carries a ``schema`` tag with its version. Nothing here may carry plaintext: token
batches hold keyed tokens and random pseudonyms; alerts hold pseudonyms, county ids, contacts
and comparison-level labels.

Endpoints (all POST bodies are signed envelopes, see :mod:`federation.signing`):

=====================  ==========================  =================  ==================
endpoint               envelope kind               sender -> receiver  reply
=====================  ==========================  =================  ==================
matcher /v1/batches    ``token_batch``             node -> matcher     signed ``ack``
matcher /v1/feedback   ``feedback``                node -> matcher     signed ``ack``
node /v1/alerts        ``alert_batch``             matcher -> node     signed ``ack``
=====================  ==========================  =================  ==================
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "MAX_ALERT_BATCH",
    "MAX_BATCH_RECORDS",
    "Ack",
    "AlertBatch",
    "AlertBody",
    "ExplanationItem",
    "FeedbackBody",
    "OtherCounty",
    "Review",
    "TokenBatch",
    "WithdrawalBody",
]

#: Largest number of upserts plus tombstones in one token batch.
MAX_BATCH_RECORDS = 20_000

Id = Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,64}$")]
Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{8,64}$")]
TokenValue = int | str | None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenSpecRef(_Body):
    """Which token spec (and key epoch) made a batch's tokens; a mismatch is refused."""

    version: str
    fingerprint: Hex
    epoch: int = Field(ge=1)


class TokenBatch(_Body):
    """Records a node publishes: new or changed records as upserts, removed ones as tombstones.

    ``rows`` are column-ordered as ``columns``: ``pseudonym``, ``household``, ``role`` then
    the token columns of the spec. Tokens are signed 64-bit integers or null.

    ``epoch_complete`` marks the last batch of a node's re-tokenisation under a new key epoch
    (``token_spec.epoch``): with it, every record the node holds has been published under that
    epoch. The matcher switches to the new epoch once every node holding tokens has sent it.
    """

    schema_: Literal["token_batch/1"] = Field("token_batch/1", alias="schema")
    batch_id: Hex
    county: Id
    token_spec: TokenSpecRef
    columns: list[str]
    rows: list[list[TokenValue]] = Field(max_length=MAX_BATCH_RECORDS)
    tombstones: list[Hex] = Field(default_factory=list, max_length=MAX_BATCH_RECORDS)
    epoch_complete: bool = False

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Ack(_Body):
    """The receiver's signed acknowledgement: the message is stored (or was already)."""

    schema_: Literal["ack/1"] = Field("ack/1", alias="schema")
    ref: str  # batch_id, alert_id or feedback_id acknowledged
    status: Literal["stored", "duplicate"]
    count: int = 0

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class OtherCounty(_Body):
    """Another county involved in an alert, and who to contact there."""

    county: Id
    display_name: str
    contact_name: str
    contact_email: str
    contact_phone: str


class ExplanationItem(_Body):
    """How one field compared in the strongest link behind an alert."""

    field: str
    level: str
    weight: float


class Review(_Body):
    """That a county reviewed the alert, and its decision (never its note)."""

    county: Id
    decision: Literal["same", "not_same", "need_info"]


class AlertBody(_Body):
    """A person or family alert for one county, about its own record or household.

    The same ``alert_id`` may arrive again with a higher ``version`` when the cluster
    changes (another county joins, a review is recorded); the node keeps the newest.
    """

    schema_: Literal["alert/1"] = Field("alert/1", alias="schema")
    alert_id: Hex
    version: int = Field(ge=1)
    kind: Literal["person", "family"]
    county: Id
    cluster_id: str
    pseudonym: Hex | None = None
    household: Hex | None = None
    other_counties: list[OtherCounty]
    match_probability: float = Field(ge=0, le=1)
    explanation: list[ExplanationItem]
    reviews: list[Review] = Field(default_factory=list)
    created_at: float

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class WithdrawalBody(_Body):
    """An alert no longer holds (a record was withdrawn, or the cluster split)."""

    schema_: Literal["withdrawal/1"] = Field("withdrawal/1", alias="schema")
    alert_id: Hex
    version: int = Field(ge=1)
    county: Id
    reason: str

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


#: Largest number of alerts plus withdrawals in one alert batch.
MAX_ALERT_BATCH = 1000


class AlertBatch(_Body):
    """Alerts and withdrawals for one county in one signed message (one transaction there)."""

    schema_: Literal["alert_batch/1"] = Field("alert_batch/1", alias="schema")
    batch_id: Hex
    county: Id
    alerts: list[AlertBody] = Field(default_factory=list, max_length=MAX_ALERT_BATCH)
    withdrawals: list[WithdrawalBody] = Field(default_factory=list, max_length=MAX_ALERT_BATCH)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class FeedbackBody(_Body):
    """A safeguarding lead's clerical decision on an alert (the note stays at the county)."""

    schema_: Literal["feedback/1"] = Field("feedback/1", alias="schema")
    feedback_id: Hex
    alert_id: Hex
    county: Id
    decision: Literal["same", "not_same", "need_info"]

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


SCHEMAS: dict[str, type[BaseModel]] = {
    "token_batch": TokenBatch,
    "ack": Ack,
    "alert": AlertBody,
    "withdrawal": WithdrawalBody,
    "alert_batch": AlertBatch,
    "feedback": FeedbackBody,
}


def json_schema(name: str) -> dict[str, object]:
    """The JSON Schema of message ``name`` as committed under ``schemas/``."""
    schema = SCHEMAS[name].model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://jigsaw.example/schemas/{name}/1.json"
    return schema


def write_schemas(directory: Path) -> None:
    """Write every message schema to ``directory/<name>.schema.json``."""
    for name in SCHEMAS:
        text = json.dumps(json_schema(name), indent=2, sort_keys=True) + "\n"
        (directory / f"{name}.schema.json").write_text(text)


if __name__ == "__main__":
    write_schemas(Path(__file__).resolve().parent.parent / "schemas")
