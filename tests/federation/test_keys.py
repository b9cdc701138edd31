"""Key files: the federation secret, signing keys, and a federation's layout."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from federation.errors import ConfigError
from federation.keys import (
    MIN_SECRET_BYTES,
    SECRET_ENV_VAR,
    check_owner_only,
    generate_federation_secret,
    generate_keypair,
    init_federation,
    list_keys,
    load_private_key,
    load_public_key,
    load_secret,
    matcher_key_path,
    node_key_path,
    public_key_b64,
    public_key_fingerprint,
    public_key_from_b64,
    registry_path,
    secret_path,
    write_private_key,
    write_secret,
)
from federation.registry import Registry

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- the secret


def test_generated_secret_is_long_and_random() -> None:
    a, b = generate_federation_secret(), generate_federation_secret()
    assert len(a) == MIN_SECRET_BYTES
    assert a != b


def test_secret_file_is_owner_only_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "federation.key"
    secret = generate_federation_secret()
    write_secret(path, secret)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert load_secret(path) == secret
    assert load_secret(str(path)) == secret


def test_secret_file_is_not_overwritten_by_accident(tmp_path: Path) -> None:
    path = tmp_path / "federation.key"
    first, second = generate_federation_secret(), generate_federation_secret()
    write_secret(path, first)
    with pytest.raises(ConfigError, match="already exists"):
        write_secret(path, second)
    assert load_secret(path) == first
    write_secret(path, second, overwrite=True)
    assert load_secret(path) == second
    assert _mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["federation.key"]  # no temp files left


def test_group_readable_secret_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "federation.key"
    write_secret(path, generate_federation_secret())
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_secret(path)


def test_missing_secret_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_secret(tmp_path / "nope.key")
    assert isinstance(info.value.__cause__, OSError)


def test_secret_from_environment_base64_and_hex() -> None:
    secret = generate_federation_secret()
    b64 = base64.b64encode(secret).decode()
    assert load_secret(environ={SECRET_ENV_VAR: b64}) == secret
    assert load_secret(environ={SECRET_ENV_VAR: secret.hex()}) == secret
    assert load_secret(environ={SECRET_ENV_VAR: secret.hex().upper()}) == secret
    assert load_secret(environ={SECRET_ENV_VAR: f"  {b64}\n"}) == secret
    assert load_secret(environ={SECRET_ENV_VAR: "hex:" + secret.hex()}) == secret
    assert load_secret(environ={SECRET_ENV_VAR: "base64:" + b64}) == secret
    urlsafe = base64.urlsafe_b64encode(secret).decode().rstrip("=")
    assert load_secret(environ={SECRET_ENV_VAR: urlsafe}) == secret


def test_secret_from_real_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = generate_federation_secret()
    monkeypatch.setenv(SECRET_ENV_VAR, secret.hex())
    assert load_secret() == secret


def test_missing_environment_secret() -> None:
    with pytest.raises(ConfigError, match=SECRET_ENV_VAR):
        load_secret(environ={})
    with pytest.raises(ConfigError, match=SECRET_ENV_VAR):
        load_secret(environ={SECRET_ENV_VAR: "   "})


WEAK_SECRETS = {
    "changeme": "changeme",
    "changeme padded": "CHANGEME-changeme-changeme-changeme-changeme",
    "short base64": base64.b64encode(os.urandom(16)).decode(),
    "short hex": os.urandom(31).hex(),
    "all zero": (b"\0" * 32).hex(),
    "all zero base64": base64.b64encode(b"\0" * 64).decode(),
    "repeated byte": base64.b64encode(b"A" * 48).decode(),
    "repeated pattern": (b"\xde\xad\xbe\xef" * 8).hex(),
    "repeated pattern, odd length": (b"\x01\x02\x03" * 11 + b"\x01").hex(),
    "placeholder word inside": base64.b64encode(b"my-password-" + os.urandom(32)).decode(),
    "not an encoding": "!!!! not a secret at all ????",
}


@pytest.mark.parametrize("case", sorted(WEAK_SECRETS))
def test_weak_secrets_are_refused_without_revealing_them(case: str) -> None:
    value = WEAK_SECRETS[case]
    with pytest.raises(ConfigError) as info:
        load_secret(environ={SECRET_ENV_VAR: value})
    message = str(info.value)
    assert SECRET_ENV_VAR in message
    assert value not in message
    assert value.strip().lower() not in message.lower()


def test_weak_secret_in_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "federation.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"changeme\n")
    os.close(fd)
    with pytest.raises(ConfigError, match="placeholder"):
        load_secret(path)


def test_binary_secret_file_is_refused_without_chaining_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "federation.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"\xff" + os.urandom(40))
    os.close(fd)
    with pytest.raises(ConfigError) as info:
        load_secret(path)
    assert info.value.__cause__ is None  # the decode error would carry the secret's bytes


def test_write_secret_refuses_weak_secrets(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="too short"):
        write_secret(tmp_path / "s.key", b"short")
    with pytest.raises(ConfigError, match="repeated byte"):
        write_secret(tmp_path / "s.key", b"\0" * 32)
    assert not (tmp_path / "s.key").exists()


# --------------------------------------------------------------------------- signing keys


def test_private_key_files_round_trip(tmp_path: Path) -> None:
    key = generate_keypair()
    path = tmp_path / "node" / "node.key"
    write_private_key(path, key)
    pub = tmp_path / "node" / "node.key.pub"
    assert _mode(path) == 0o600
    assert _mode(pub) == 0o644
    assert _mode(path.parent) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = load_private_key(path)
    assert public_key_b64(loaded) == public_key_b64(key)
    assert public_key_b64(load_public_key(pub)) == public_key_b64(key)
    assert public_key_b64(load_public_key(str(pub))) == public_key_b64(key)
    assert public_key_b64(load_public_key(pub.read_text())) == public_key_b64(key)


def test_private_key_is_not_overwritten_by_accident(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first = generate_keypair()
    write_private_key(path, first)
    with pytest.raises(ConfigError, match="already exists"):
        write_private_key(path, generate_keypair())
    assert public_key_b64(load_private_key(path)) == public_key_b64(first)
    second = generate_keypair()
    write_private_key(path, second, overwrite=True)
    assert public_key_b64(load_private_key(path)) == public_key_b64(second)
    assert public_key_b64(load_public_key(tmp_path / "node.key.pub")) == public_key_b64(second)


def test_loose_private_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    write_private_key(path, generate_keypair())
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="group or others"):
        load_private_key(path)
    with pytest.raises(ConfigError, match="0644"):
        check_owner_only(path)
    path.chmod(0o600)
    check_owner_only(path)


def test_check_owner_only_refuses_missing_files_and_directories(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        check_owner_only(tmp_path / "missing")
    with pytest.raises(ConfigError, match="regular file"):
        check_owner_only(tmp_path)


def test_garbage_key_files_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n")
    os.close(fd)
    with pytest.raises(ConfigError) as info:
        load_private_key(path)
    assert info.value.__cause__ is not None
    with pytest.raises(ConfigError):
        load_public_key(path)
    with pytest.raises(ConfigError):
        load_public_key(tmp_path / "missing.pub")


def test_non_ed25519_keys_are_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    other = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(
        fd,
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    os.close(fd)
    with pytest.raises(ConfigError, match="Ed25519"):
        load_private_key(path)
    pem = (
        other.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(ConfigError, match="Ed25519"):
        load_public_key(pem)


def test_public_key_base64_round_trip_and_fingerprint() -> None:
    key = generate_keypair()
    text = public_key_b64(key.public_key())
    assert text == public_key_b64(key)
    assert len(base64.b64decode(text)) == 32
    assert public_key_b64(public_key_from_b64(text)) == text
    fingerprint = public_key_fingerprint(key)
    assert len(fingerprint) == 16
    assert fingerprint == public_key_fingerprint(public_key_from_b64(text))


@pytest.mark.parametrize("bad", ["", "not base64!", base64.b64encode(b"x" * 31).decode()])
def test_bad_public_key_base64_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError):
        public_key_from_b64(bad)


# --------------------------------------------------------------------------- a federation


def _init(directory: Path) -> Path:
    return init_federation(
        directory,
        node_ids=["northshire", "southmoor"],
        matcher_url="http://127.0.0.1:8700",
        node_urls={"northshire": "http://127.0.0.1:8701", "southmoor": "http://127.0.0.1:8702"},
        contacts={
            "northshire": {
                "name": "Northshire MASH (example)",
                "email": "mash@northshire.example.org",
                "phone": "01632 960001",
            }
        },
    )


def test_init_federation_lays_out_keys_and_registry(tmp_path: Path) -> None:
    directory = tmp_path / "fed"
    registry_file = _init(directory)
    assert registry_file == registry_path(directory)

    assert _mode(secret_path(directory)) == 0o600
    assert _mode(secret_path(directory).parent) == 0o700
    load_secret(secret_path(directory))
    # Invariant 2: nothing under the matcher's directory is the secret.
    matcher_files = sorted(p.name for p in (directory / "matcher").iterdir())
    assert matcher_files == ["matcher.key", "matcher.key.pub"]
    assert _mode(matcher_key_path(directory)) == 0o600
    assert _mode(directory / "matcher") == 0o700

    registry = Registry.load(registry_file)
    assert sorted(registry.nodes) == ["northshire", "southmoor"]
    assert registry.matcher_url == "http://127.0.0.1:8700"
    for node_id in ("northshire", "southmoor"):
        key = load_private_key(node_key_path(directory, node_id))
        assert public_key_b64(key) == public_key_b64(registry.nodes[node_id].public_key)
        assert _mode(node_key_path(directory, node_id)) == 0o600
    matcher = load_private_key(matcher_key_path(directory))
    assert public_key_b64(matcher) == public_key_b64(registry.matcher_public_key)
    assert registry.nodes["northshire"].contact.email == "mash@northshire.example.org"
    # Nodes without a contact get an obviously fictional one.
    southmoor = registry.nodes["southmoor"].contact
    assert southmoor.email.endswith("@example.org")
    assert southmoor.phone.startswith("01632 960")
    assert registry.nodes["southmoor"].display_name == "Southmoor"


def test_init_federation_refuses_to_overwrite(tmp_path: Path) -> None:
    _init(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="already exists"):
        _init(tmp_path)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert before == after


def test_init_federation_lists_every_problem_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        init_federation(
            tmp_path / "fed",
            node_ids=["northshire", "northshire", "South Moor"],
            matcher_url="ftp://matcher",
            node_urls={"northshire": "http://127.0.0.1:1", "eastvale": "http://127.0.0.1:2"},
            contacts={"northshire": {"name": "x"}},
        )
    problems = info.value.problems
    assert any("duplicate node id 'northshire'" in p for p in problems)
    assert any("no URL for node 'South Moor'" in p for p in problems)
    assert any("URL for unknown node 'eastvale'" in p for p in problems)
    assert any("lacks email, phone" in p for p in problems)
    assert not (tmp_path / "fed").exists()

    with pytest.raises(ConfigError) as info:
        init_federation(
            tmp_path / "fed",
            node_ids=["Bad Id"],
            matcher_url="ftp://matcher",
            node_urls={"Bad Id": "http://127.0.0.1:1"},
        )
    text = str(info.value)
    assert "id 'Bad Id'" in text
    assert "matcher: url" in text
    assert not (tmp_path / "fed").exists()


def test_list_keys_shows_fingerprints_never_secrets(tmp_path: Path) -> None:
    _init(tmp_path)
    keys = list_keys(tmp_path)
    assert [(k.id, k.role) for k in keys] == [
        ("matcher", "matcher"),
        ("northshire", "node"),
        ("southmoor", "node"),
        ("federation", "secret"),
    ]
    registry = Registry.load(registry_path(tmp_path))
    assert keys[0].fingerprint == public_key_fingerprint(registry.matcher_public_key)
    assert keys[1].fingerprint == public_key_fingerprint(registry.nodes["northshire"].public_key)
    assert keys[3].fingerprint is None
    secret_text = secret_path(tmp_path).read_text().strip()
    assert secret_text not in repr(keys)
    assert keys[2].path == node_key_path(tmp_path, "southmoor")


def test_list_keys_of_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        list_keys(tmp_path / "missing")
