"""The federation registry: round trip, validation reporting every problem at once."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from federation.errors import ConfigError
from federation.keys import generate_keypair, public_key_b64
from federation.registry import MATCHER_ID, Contact, NodeEntry, Registry, default_display_name

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "federation.example.toml"


def _registry() -> Registry:
    nodes = {
        node_id: NodeEntry(
            node_id=node_id,
            url=f"http://127.0.0.1:{port}",
            public_key=generate_keypair().public_key(),
            contact=Contact(
                name=f'{node_id} "duty" desk \\ MASH – Zoë',
                email=f"duty@{node_id}.example.org",
                phone=f"01632 960{port % 1000:03d}",
            ),
            display_name=default_display_name(node_id) + " County Council",
        )
        for node_id, port in (("northshire", 8701), ("west_moor", 8702))
    }
    return Registry(
        matcher_url="https://matcher.example.org/jigsaw",
        matcher_public_key=generate_keypair().public_key(),
        nodes=nodes,
    )


def _same(a: Registry, b: Registry) -> bool:
    return a.to_toml() == b.to_toml()


def test_round_trip(tmp_path: Path) -> None:
    registry = _registry()
    path = tmp_path / "registry.toml"
    registry.save(path)
    loaded = Registry.load(path)
    assert _same(loaded, registry)
    assert loaded.nodes["northshire"].contact == registry.nodes["northshire"].contact
    assert loaded.nodes["west_moor"].display_name == "West Moor County Council"
    assert public_key_b64(loaded.matcher_public_key) == public_key_b64(registry.matcher_public_key)
    assert path.stat().st_mode & 0o777 == 0o644


def test_public_keys_lists_every_party() -> None:
    registry = _registry()
    keys = registry.public_keys()
    assert sorted(keys) == [MATCHER_ID, "northshire", "west_moor"]
    assert keys["northshire"] is registry.nodes["northshire"].public_key
    assert keys[MATCHER_ID] is registry.matcher_public_key


def test_example_config_is_valid() -> None:
    registry = Registry.load(EXAMPLE)
    assert len(registry.nodes) == 2
    for entry in registry.nodes.values():
        assert entry.contact.email.endswith("example.org")


def test_display_name_is_optional() -> None:
    text = _registry().to_toml().replace('display_name = "West Moor County Council"\n', "")
    assert Registry.loads(text).nodes["west_moor"].display_name == "West Moor"


def _key() -> str:
    return public_key_b64(generate_keypair())


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    shared = _key()
    text = f"""
version = 2
colour = "blue"

[matcher]
url = "ftp://matcher"
public_key = "{shared}"

[[nodes]]
id = "northshire"
display_name = "  "
url = "http://127.0.0.1:8701"
public_key = "not base64!"
contact = {{ name = "Duty desk", email = "duty@northshire.example.org", phone = "01632 960001" }}

[[nodes]]
id = "northshire"
url = "http://user:pw@127.0.0.1:8702"
public_key = "{shared}"
contact = {{ name = "", email = "not-an-email", phone = "call us" }}

[[nodes]]
id = "South Moor"
url = "http://127.0.0.1:99999"
public_key = "{_key()[:-8]}"
pubic_key = "typo"

[[nodes]]
id = "matcher"
url = "http://127.0.0.1:8703/?x=1"
public_key = "{_key()}"
contact = {{ name = "x", email = "x@example.org", phone = "01632 960003", fax = "1" }}
"""
    path = tmp_path / "registry.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        Registry.load(path)
    error = info.value
    expected = [
        "unknown top-level key 'colour'",
        "version must be 1",
        "matcher: url 'ftp://matcher'",
        "nodes[0] (northshire): public_key: not valid base64",
        "nodes[0] (northshire): display_name must be a non-empty string",
        "nodes[1] (northshire): duplicate id 'northshire' (also nodes[0])",
        "nodes[1] (northshire): url must not contain credentials",
        "nodes[1] (northshire): public_key is the same as matcher's",
        "nodes[1] (northshire): contact.name",
        "nodes[1] (northshire): contact.email",
        "nodes[1] (northshire): contact.phone",
        "nodes[2]: id 'South Moor' must be 1-64 characters of [a-z0-9_-]",
        "nodes[2]: unknown key 'pubic_key'",
        "nodes[2]: url 'http://127.0.0.1:99999' is not a valid URL",
        "nodes[2]: public_key: decodes to",
        "nodes[2]: contact { name, email, phone } is missing",
        "nodes[3] (matcher): id 'matcher' is reserved",
        "nodes[3] (matcher): url 'http://127.0.0.1:8703/?x=1' must not have a query",
        "nodes[3] (matcher): contact: unknown key 'fax'",
    ]
    for fragment in expected:
        assert any(fragment in p for p in error.problems), fragment
    assert len(error.problems) == len(expected)
    message = str(error)
    assert message.startswith(f"{path}: {len(expected)} problems:")
    assert all(p in message for p in error.problems)


def test_missing_sections() -> None:
    with pytest.raises(ConfigError) as info:
        Registry.loads("version = 1\n")
    assert "missing [matcher] table" in info.value.problems
    assert any("no nodes" in p for p in info.value.problems)
    with pytest.raises(ConfigError, match="array of tables"):
        Registry.loads('version = 1\nnodes = "x"\n')


def test_bad_toml_is_translated() -> None:
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        Registry.loads("version = = 1")
    assert isinstance(info.value.__cause__, tomllib.TOMLDecodeError)


def test_missing_file_is_translated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read registry") as info:
        Registry.load(tmp_path / "missing.toml")
    assert isinstance(info.value.__cause__, OSError)


def test_save_refuses_an_invalid_registry(tmp_path: Path) -> None:
    registry = _registry()
    entry = registry.nodes["northshire"]
    bad = Registry(
        matcher_url="not a url",
        matcher_public_key=registry.matcher_public_key,
        nodes={
            "northshire": entry,
            "other": entry,  # key does not match the entry's id
        },
    )
    path = tmp_path / "registry.toml"
    with pytest.raises(ConfigError, match="holds the entry for 'northshire'"):
        bad.save(path)
    bad_url = Registry(
        matcher_url="not a url",
        matcher_public_key=registry.matcher_public_key,
        nodes={"northshire": entry},
    )
    with pytest.raises(ConfigError, match="matcher: url"):
        bad_url.save(path)
    assert not path.exists()


def test_save_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    first, second = _registry(), _registry()
    first.save(path)
    second.save(path)
    assert _same(Registry.load(path), second)
    assert [p.name for p in tmp_path.iterdir()] == ["registry.toml"]


def test_control_characters_survive_the_round_trip() -> None:
    registry = _registry()
    entry = registry.nodes["northshire"]
    odd = NodeEntry(
        node_id=entry.node_id,
        url=entry.url,
        public_key=entry.public_key,
        contact=entry.contact,
        display_name='Tab\tquote" back\\slash del\x7f emoji 🦉',
    )
    text = Registry(
        registry.matcher_url, registry.matcher_public_key, {"northshire": odd}
    ).to_toml()
    assert Registry.loads(text).nodes["northshire"].display_name == odd.display_name


def test_registry_nodes_are_read_only() -> None:
    registry = Registry.loads(_registry().to_toml())
    with pytest.raises(TypeError):
        registry.nodes["x"] = registry.nodes["northshire"]  # type: ignore[index]
