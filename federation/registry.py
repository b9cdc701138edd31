"""The federation registry: who the parties are, where they listen, and their public keys.

The registry is public configuration shared by every party (it holds no secret). It is a TOML
file; ``configs/federation.example.toml`` shows the format::

    version = 1

    [matcher]
    url = "http://127.0.0.1:8700"
    public_key = "<base64 of the raw 32-byte Ed25519 public key>"

    [[nodes]]
    id = "northshire"                       # [a-z0-9_-], at most 64 characters
    display_name = "Northshire County Council"
    url = "http://127.0.0.1:8701"
    public_key = "..."
    [nodes.contact]                         # who the other counties' alerts say to call
    name = "..."
    email = "..."
    phone = "..."

Nodes are an array of tables rather than a table keyed by id so that a duplicated id is
reported as a problem instead of being a TOML syntax error. :meth:`Registry.load` validates the
whole file and reports every problem at once in one :class:`~federation.errors.ConfigError`.
"""

from __future__ import annotations

import os
import re
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from federation.errors import ConfigError
from federation.keys import public_key_b64, public_key_from_b64

__all__ = [
    "MATCHER_ID",
    "PARTY_ID_RE",
    "REGISTRY_VERSION",
    "Contact",
    "NodeEntry",
    "Registry",
    "default_display_name",
]

REGISTRY_VERSION = 1
MATCHER_ID = "matcher"
"""The registry id (and envelope sender/recipient) of the central matcher."""

PARTY_ID_RE = re.compile(r"[a-z0-9_-]{1,64}")
"""What a node id must look like (it is used in URLs, file paths and envelopes)."""

_EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_PHONE_RE = re.compile(r"\+?[0-9][0-9 ()-]{2,30}")
_TOP_KEYS = frozenset({"version", "matcher", "nodes"})
_MATCHER_KEYS = frozenset({"url", "public_key"})
_NODE_KEYS = frozenset({"id", "display_name", "url", "public_key", "contact"})
_CONTACT_KEYS = frozenset({"name", "email", "phone"})


@dataclass(frozen=True)
class Contact:
    """Who to call at a county about a match (shown in the other counties' alerts).

    Attributes:
        name: A person or a team, e.g. "Multi-Agency Safeguarding Hub".
        email: A monitored address.
        phone: A telephone number.
    """

    name: str
    email: str
    phone: str


@dataclass(frozen=True)
class NodeEntry:
    """One county node in the registry.

    Attributes:
        node_id: The county id (``[a-z0-9_-]``), used as envelope sender and in URLs.
        url: Base URL of the node's HTTP API.
        public_key: The node's Ed25519 public key, which signs everything it sends.
        contact: Who to contact at this county about a match.
        display_name: Human-readable name, e.g. "Warwickshire County Council".
    """

    node_id: str
    url: str
    public_key: Ed25519PublicKey
    contact: Contact
    display_name: str


@dataclass(frozen=True)
class Registry:
    """The parties of one federation and their public keys.

    Build one with :meth:`load` (validated); a registry built directly is validated when
    it is saved.

    Attributes:
        matcher_url: Base URL of the matcher's HTTP API.
        matcher_public_key: The matcher's Ed25519 public key.
        nodes: Node id to entry.
    """

    matcher_url: str
    matcher_public_key: Ed25519PublicKey
    nodes: Mapping[str, NodeEntry]

    @classmethod
    def load(cls, path: Path) -> Registry:
        """Read and validate a registry file.

        Args:
            path: The TOML registry file.

        Returns:
            The registry.

        Raises:
            ConfigError: If the file cannot be read or parsed, or is invalid; the error lists
                every problem found (duplicate ids, bad ids, bad keys, bad URLs, ...).
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read registry: {e}", source=str(path)) from e
        return cls.loads(text, source=str(path))

    @classmethod
    def loads(cls, text: str, *, source: str = "<registry>") -> Registry:
        """Parse and validate registry TOML text; see :meth:`load`.

        Args:
            text: The TOML text.
            source: Name used in error messages.

        Returns:
            The registry.

        Raises:
            ConfigError: If the text is not valid TOML or not a valid registry.
        """
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"not valid TOML: {e}", source=source) from e
        problems: list[str] = []
        registry = _parse(data, problems)
        if problems or registry is None:
            raise ConfigError(problems or ["invalid registry"], source=source)
        return registry

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        """Return every party's public key: each node id, and ``"matcher"``.

        This is the ``public_keys`` argument of :func:`federation.signing.verify`.
        """
        keys = {node_id: entry.public_key for node_id, entry in self.nodes.items()}
        keys[MATCHER_ID] = self.matcher_public_key
        return keys

    def to_toml(self) -> str:
        """Render the registry as TOML, in the format :meth:`load` reads."""
        lines = [
            "# Jigsaw federation registry: public information only (no secrets).",
            f"version = {REGISTRY_VERSION}",
            "",
            "[matcher]",
            f"url = {_toml_str(self.matcher_url)}",
            f"public_key = {_toml_str(public_key_b64(self.matcher_public_key))}",
        ]
        for node_id in sorted(self.nodes):
            entry = self.nodes[node_id]
            contact = entry.contact
            lines += [
                "",
                "[[nodes]]",
                f"id = {_toml_str(entry.node_id)}",
                f"display_name = {_toml_str(entry.display_name)}",
                f"url = {_toml_str(entry.url)}",
                f"public_key = {_toml_str(public_key_b64(entry.public_key))}",
                "[nodes.contact]",
                f"name = {_toml_str(contact.name)}",
                f"email = {_toml_str(contact.email)}",
                f"phone = {_toml_str(contact.phone)}",
            ]
        return "\n".join(lines) + "\n"

    def save(self, path: Path) -> None:
        """Validate the registry and write it atomically to ``path`` (mode 0644).

        Args:
            path: Destination file; replaced if it exists.

        Raises:
            ConfigError: If the registry is invalid (it is then not written) or the file
                cannot be written.
        """
        path = Path(path)
        mismatched = [
            f"nodes: key {key!r} holds the entry for {entry.node_id!r}"
            for key, entry in self.nodes.items()
            if key != entry.node_id
        ]
        if mismatched:
            raise ConfigError(mismatched, source=str(path))
        text = self.to_toml()
        # Refuse to write anything that load() would refuse to read.
        Registry.loads(text, source=str(path))
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            raise ConfigError(f"cannot write registry: {e}", source=str(path)) from e


def default_display_name(node_id: str) -> str:
    """Turn an id into a readable name: ``"west_sussex"`` -> ``"West Sussex"``."""
    return " ".join(part.capitalize() for part in re.split(r"[_-]+", node_id) if part)


# --------------------------------------------------------------------------- validation


def _parse(data: Mapping[str, Any], problems: list[str]) -> Registry | None:
    """Validate decoded TOML, appending every problem found; return None if any."""
    for key in sorted(set(data) - _TOP_KEYS):
        problems.append(f"unknown top-level key {key!r}")
    version = data.get("version")
    if type(version) is not int or version != REGISTRY_VERSION:  # TOML true == 1 in Python
        problems.append(f"version must be {REGISTRY_VERSION}, got {version!r}")

    seen_keys: dict[bytes, str] = {}
    matcher_url = ""
    matcher_key: Ed25519PublicKey | None = None
    matcher = data.get("matcher")
    if not isinstance(matcher, Mapping):
        problems.append("missing [matcher] table")
    else:
        for key in sorted(set(matcher) - _MATCHER_KEYS):
            problems.append(f"matcher: unknown key {key!r}")
        matcher_url = _check_url(matcher.get("url"), "matcher", problems)
        matcher_key = _check_key(matcher.get("public_key"), "matcher", problems, seen_keys)

    nodes: dict[str, NodeEntry] = {}
    raw_nodes = data.get("nodes", [])
    if not isinstance(raw_nodes, list):
        problems.append("nodes must be an array of tables ([[nodes]])")
        raw_nodes = []
    if not raw_nodes:
        problems.append("no nodes: a federation needs at least one [[nodes]] entry")
    seen_ids: dict[str, int] = {}
    for index, raw in enumerate(raw_nodes):
        entry = _parse_node(index, raw, problems, seen_keys, seen_ids)
        if entry is not None:
            nodes[entry.node_id] = entry

    if problems or matcher_key is None:
        return None
    return Registry(
        matcher_url=matcher_url,
        matcher_public_key=matcher_key,
        nodes=MappingProxyType(nodes),
    )


def _parse_node(
    index: int,
    raw: Any,
    problems: list[str],
    seen_keys: dict[bytes, str],
    seen_ids: dict[str, int],
) -> NodeEntry | None:
    where = f"nodes[{index}]"
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: must be a table")
        return None
    before = len(problems)
    node_id = raw.get("id")
    if not isinstance(node_id, str) or not PARTY_ID_RE.fullmatch(node_id):
        problems.append(f"{where}: id {node_id!r} must be 1-64 characters of [a-z0-9_-]")
        node_id = None
    else:
        where = f"{where} ({node_id})"
        if node_id == MATCHER_ID:
            problems.append(f"{where}: id {MATCHER_ID!r} is reserved for the matcher")
        elif node_id in seen_ids:
            problems.append(f"{where}: duplicate id {node_id!r} (also nodes[{seen_ids[node_id]}])")
        else:
            seen_ids[node_id] = index
    for key in sorted(set(raw) - _NODE_KEYS):
        problems.append(f"{where}: unknown key {key!r}")
    url = _check_url(raw.get("url"), where, problems)
    public_key = _check_key(raw.get("public_key"), where, problems, seen_keys)
    display_name = raw.get("display_name")
    if display_name is None:
        # Optional; without a valid id there is nothing to derive it from, but the id
        # problem is already reported.
        display_name = default_display_name(node_id or "")
    elif not isinstance(display_name, str) or not display_name.strip():
        problems.append(f"{where}: display_name must be a non-empty string")
    contact = _check_contact(raw.get("contact"), where, problems)
    if len(problems) > before or node_id is None or public_key is None or contact is None:
        return None
    assert isinstance(display_name, str)
    return NodeEntry(
        node_id=node_id, url=url, public_key=public_key, contact=contact, display_name=display_name
    )


def _check_url(value: Any, where: str, problems: list[str]) -> str:
    if not isinstance(value, str) or not value:
        problems.append(f"{where}: url is missing")
        return ""
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        problems.append(f"{where}: url {value!r} is not a valid URL")
        return ""
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f"{where}: url {value!r} must be http(s)://host[:port][/path]")
    elif parts.username is not None or parts.password is not None:
        # Credentials in a shared, public file would be leaked to every party.
        problems.append(f"{where}: url must not contain credentials")
    elif parts.query or parts.fragment:
        problems.append(f"{where}: url {value!r} must not have a query or fragment")
    return value


def _check_key(
    value: Any, where: str, problems: list[str], seen: dict[bytes, str]
) -> Ed25519PublicKey | None:
    if not isinstance(value, str) or not value:
        problems.append(f"{where}: public_key is missing")
        return None
    try:
        key = public_key_from_b64(value)
    except ConfigError as e:
        problems.append(f"{where}: public_key: {e}")
        return None
    raw = key.public_bytes_raw()
    if raw in seen:
        # Two parties sharing a key could each sign as the other.
        problems.append(f"{where}: public_key is the same as {seen[raw]}'s")
    else:
        seen[raw] = where
    return key


def _check_contact(value: Any, where: str, problems: list[str]) -> Contact | None:
    if not isinstance(value, Mapping):
        problems.append(f"{where}: contact {{ name, email, phone }} is missing")
        return None
    before = len(problems)
    for key in sorted(set(value) - _CONTACT_KEYS):
        problems.append(f"{where}: contact: unknown key {key!r}")
    name, email, phone = value.get("name"), value.get("email"), value.get("phone")
    if not isinstance(name, str) or not name.strip():
        problems.append(f"{where}: contact.name must be a non-empty string")
    if not isinstance(email, str) or not _EMAIL_RE.fullmatch(email):
        problems.append(f"{where}: contact.email must be an email address")
    if not isinstance(phone, str) or not _PHONE_RE.fullmatch(phone):
        problems.append(f"{where}: contact.phone must be a telephone number")
    if len(problems) > before:
        return None
    assert isinstance(name, str) and isinstance(email, str) and isinstance(phone, str)
    return Contact(name=name, email=email, phone=phone)


def _toml_str(value: str) -> str:
    """Quote ``value`` as a TOML basic string."""
    out = ['"']
    for ch in value:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch < " " or ch == "\x7f":
            # TOML forbids raw control characters in basic strings.
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)
