"""The committed JSON Schemas match the message models, and the models refuse bad bodies."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from federation.protocol import SCHEMAS, AlertBody, TokenBatch, json_schema

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_committed_schema_is_current(name: str) -> None:
    committed = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
    assert committed == json_schema(name), "run `python -m federation.protocol` and commit"


def _batch(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "schema": "token_batch/1",
        "batch_id": "ab" * 16,
        "county": "coventry",
        "token_spec": {"version": "1.0.0", "fingerprint": "0123456789abcdef", "epoch": 1},
        "columns": ["pseudonym", "household", "role", "dob"],
        "rows": [["cd" * 16, None, "child", 42]],
        "tombstones": [],
    }
    body.update(overrides)
    return body


def test_token_batch_round_trip() -> None:
    batch = TokenBatch.model_validate(_batch())
    assert batch.model_dump(by_alias=True)["schema"] == "token_batch/1"


@pytest.mark.parametrize(
    "overrides",
    [
        {"county": "Coventry!"},
        {"batch_id": "not-hex"},
        {"schema": "token_batch/2"},
        {"unexpected": 1},
        {"token_spec": {"version": "1", "fingerprint": "zz", "epoch": 1}},
        {"tombstones": ["x"]},
    ],
)
def test_token_batch_refuses_malformed(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        TokenBatch.model_validate(_batch(**overrides))


def test_alert_probability_bounds() -> None:
    body = {
        "schema": "alert/1",
        "alert_id": "ab" * 16,
        "version": 1,
        "kind": "person",
        "county": "coventry",
        "cluster_id": "c-1",
        "pseudonym": "cd" * 16,
        "other_counties": [],
        "match_probability": 1.5,
        "explanation": [],
        "created_at": 0.0,
    }
    with pytest.raises(ValidationError):
        AlertBody.model_validate(body)
    body["match_probability"] = 0.97
    assert AlertBody.model_validate(body).kind == "person"
