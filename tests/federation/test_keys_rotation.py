"""Key epochs of the federation secret: ``jigsaw keys rotate``, ``list`` and ``retire``.

The secret of epoch 1 is ``secret/federation.key`` (as ``jigsaw keys init`` writes it); a
rotation writes ``secret/federation.<N>.key`` beside it, owner-only, and keeps the old one until
it is retired. Every change is an entry in the directory's hash-chained audit log, which names
epochs and files, never key material; neither does any command's output. A node's settings take
the epoch from such a file's name, and refuse a ``key_epoch`` that contradicts it.
"""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from federation.audit import verify_audit_file
from federation.cli import app
from federation.errors import ConfigError
from federation.keys import (
    init_federation,
    keys_audit_path,
    list_keys,
    load_secret,
    retire_secret,
    rotate_secret,
    secret_epoch_of,
    secret_epoch_path,
    secret_epochs,
    secret_path,
    write_secret,
)
from federation.settings import NodeSettings, load_settings

runner = CliRunner()


@pytest.fixture
def fed(tmp_path: Path) -> Path:
    directory = tmp_path / "fed"
    init_federation(
        directory,
        node_ids=["northshire", "southmoor"],
        matcher_url="http://127.0.0.1:8700",
        node_urls={"northshire": "http://127.0.0.1:8701", "southmoor": "http://127.0.0.1:8702"},
    )
    return directory


def _texts(secret: bytes) -> list[str]:
    b64 = base64.b64encode(secret).decode()
    return [b64, b64.rstrip("="), secret.hex()]


def _audit(directory: Path) -> list[tuple[str, str]]:
    conn = duckdb.connect(str(keys_audit_path(directory)), read_only=True)
    try:
        rows = conn.execute("SELECT event, details FROM audit_log ORDER BY seq").fetchall()
    finally:
        conn.close()
    return [(str(e), str(d)) for e, d in rows]


def test_rotate_writes_the_next_epoch_beside_the_current_one(fed: Path) -> None:
    first = load_secret(secret_path(fed))
    epoch, path = rotate_secret(fed)
    assert (epoch, path) == (2, fed / "secret" / "federation.2.key")
    assert path == secret_epoch_path(fed, 2)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = load_secret(path)
    assert second != first
    assert load_secret(secret_path(fed)) == first  # the old secret is kept until retired
    assert rotate_secret(fed)[0] == 3
    assert list(secret_epochs(fed)) == [1, 2, 3]
    # Nothing under the matcher's directory changed: it never holds a secret.
    assert sorted(p.name for p in (fed / "matcher").iterdir()) == [
        "matcher.key",
        "matcher.key.pub",
    ]

    events = _audit(fed)
    assert [e for e, _ in events] == ["keys.rotated", "keys.rotated"]
    assert '"epoch":2' in events[0][1] and '"previous_epoch":1' in events[0][1]
    assert verify_audit_file(keys_audit_path(fed)).ok
    raw = keys_audit_path(fed).read_bytes()
    for secret in (first, second):
        assert secret not in raw
        assert not any(text.encode() in raw for text in _texts(secret))


def test_list_shows_epochs_and_never_secrets(fed: Path) -> None:
    rotate_secret(fed)
    keys = list_keys(fed)
    secrets_listed = [k for k in keys if k.role == "secret"]
    assert [(k.epoch, k.path.name, k.fingerprint) for k in secrets_listed] == [
        (1, "federation.key", None),
        (2, "federation.2.key", None),
    ]
    assert all(k.epoch is None for k in keys if k.role != "secret")
    for info in secrets_listed:
        for text in _texts(load_secret(info.path)):
            assert text not in repr(keys)


def test_retire_deletes_an_old_epoch_only(fed: Path) -> None:
    _, new = rotate_secret(fed)
    with pytest.raises(ConfigError, match="current secret"):
        retire_secret(fed, 2)
    with pytest.raises(ConfigError, match="no secret of key epoch 5"):
        retire_secret(fed, 5)
    assert retire_secret(fed, 1) == secret_path(fed)
    assert not secret_path(fed).exists() and new.exists()
    assert list(secret_epochs(fed)) == [2]
    assert [e for e, _ in _audit(fed)] == ["keys.rotated", "keys.retired"]
    # The next rotation follows on from the newest epoch.
    assert rotate_secret(fed)[0] == 3


def test_rotate_needs_a_secret_and_one_file_per_epoch(tmp_path: Path, fed: Path) -> None:
    with pytest.raises(ConfigError, match="jigsaw keys init"):
        rotate_secret(tmp_path / "empty")
    assert not keys_audit_path(tmp_path / "empty").exists()
    write_secret(fed / "secret" / "federation.1.key", load_secret(secret_path(fed)))
    with pytest.raises(ConfigError, match="two secret files for key epoch 1"):
        rotate_secret(fed)


def test_secret_epoch_from_file_name() -> None:
    assert secret_epoch_of("/etc/jigsaw/federation.12.key") == 12
    assert secret_epoch_of(Path("federation.2.key")) == 2
    for name in ("federation.key", "federation.0.key", "federation.x.key", "secret", "f.2.key"):
        assert secret_epoch_of(name) is None


def test_cli_rotate_list_retire(fed: Path) -> None:
    result = runner.invoke(app, ["keys", "rotate", str(fed)])
    assert result.exit_code == 0, result.output
    assert "key epoch 2" in result.output
    assert "jigsaw keys retire" in result.output

    result = runner.invoke(app, ["keys", "list", str(fed)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "2 (current)" in result.output
    assert "federation.2.key" in result.output

    result = runner.invoke(app, ["keys", "retire", str(fed), "--epoch", "2"])
    assert result.exit_code == 2
    assert "current secret" in result.output

    result = runner.invoke(app, ["keys", "retire", str(fed), "--epoch", "1"])
    assert result.exit_code == 0, result.output
    assert not secret_path(fed).exists()

    new = load_secret(secret_epoch_path(fed, 2))
    result = runner.invoke(app, ["keys", "list", str(fed)], env={"COLUMNS": "200"})
    assert "federation.key " not in result.output
    assert not any(text in result.output for text in _texts(new))

    result = runner.invoke(app, ["keys", "rotate", str(fed / "missing")])
    assert result.exit_code == 2


def _node_settings(tmp_path: Path, secret: Path | None, **extra: object) -> NodeSettings:
    lines = [
        'node_id = "northshire"',
        f'data_dir = "{tmp_path / "data"}"',
        f'registry = "{tmp_path / "registry.toml"}"',
        f'private_key = "{tmp_path / "node.key"}"',
        'admin_token = "n0d3-Adm1n-T0k3n-Qx7Lp2Zr"',
    ]
    if secret is not None:
        lines.append(f'secret = "{secret}"')
    lines += [f"{key} = {value}" for key, value in extra.items()]
    config = tmp_path / "node.toml"
    config.write_text("\n".join(lines) + "\n")
    return load_settings(NodeSettings, config)


def test_node_settings_take_the_epoch_from_the_secret_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JIGSAW_NODE_KEY_EPOCH", raising=False)
    assert _node_settings(tmp_path, tmp_path / "federation.3.key").key_epoch == 3
    assert _node_settings(tmp_path, tmp_path / "federation.3.key", key_epoch=3).key_epoch == 3
    assert _node_settings(tmp_path, tmp_path / "federation.key").key_epoch == 1
    assert _node_settings(tmp_path, tmp_path / "county.secret", key_epoch=2).key_epoch == 2
    assert _node_settings(tmp_path, None, key_epoch=4).key_epoch == 4
    with pytest.raises(ConfigError, match="is for key epoch 3"):
        _node_settings(tmp_path, tmp_path / "federation.3.key", key_epoch=2)
    monkeypatch.setenv("JIGSAW_NODE_KEY_EPOCH", "5")
    assert _node_settings(tmp_path, None).key_epoch == 5
    with pytest.raises(ConfigError, match="is for key epoch 3"):
        _node_settings(tmp_path, tmp_path / "federation.3.key")
