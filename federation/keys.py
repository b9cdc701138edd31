"""Key material: the federation secret, Ed25519 signing keys, and a federation's key layout.

Two kinds of key, with very different audiences:

* The **federation secret** (32+ random bytes) keys the tokenisation of identifiers. Every
  county node holds it; the matcher must never hold it (design invariant 2), otherwise it
  could dictionary-attack the tokens. It is stored as base64 text in a 0600 file, or given in
  the ``JIGSAW_FEDERATION_SECRET`` environment variable (base64 or hex).
* **Signing keys** (Ed25519), one pair per party. The private key (PEM, PKCS8, 0600) signs
  what the party sends; the public key goes into the registry so that everyone else can
  verify it.

:func:`init_federation` lays out a whole federation on one machine (used by the demo)::

    DIR/secret/federation.key          the federation secret (key epoch 1), for the nodes only
    DIR/secret/federation.<N>.key      the secret of key epoch N >= 2 (``jigsaw keys rotate``)
    DIR/matcher/matcher.key(.pub)      the matcher's signing key (no secret in here)
    DIR/nodes/<id>/node.key(.pub)      each node's signing key
    DIR/registry.toml                  the public registry
    DIR/keys-audit.duckdb              hash-chained audit of rotations and retirements

**Key epochs.** Rotating the federation secret (:func:`rotate_secret`) writes the next epoch's
secret beside the current one; the newest epoch present is the current one. Both stay until the
matcher has switched to the new epoch (every node has re-tokenised under it), then the old one
is deleted with :func:`retire_secret`. A node finds the epoch of a ``federation.<N>.key`` file
from its name (:func:`secret_epoch_of`; see ``NodeSettings.key_epoch``).

No function here puts a secret or private key into an exception message or a return value
meant for display; errors name files and environment variables, never their contents.
Private keys are not passphrase-encrypted: services load them unattended, so the protection
is file permissions (checked on every load by :func:`check_owner_only`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import duckdb
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from federation.audit import AuditLog
from federation.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from federation.registry import Contact

__all__ = [
    "MIN_SECRET_BYTES",
    "SECRET_ENV_VAR",
    "KeyInfo",
    "check_owner_only",
    "generate_federation_secret",
    "generate_keypair",
    "init_federation",
    "keys_audit_path",
    "list_keys",
    "load_private_key",
    "load_public_key",
    "load_secret",
    "matcher_key_path",
    "node_key_path",
    "public_key_b64",
    "public_key_fingerprint",
    "public_key_from_b64",
    "registry_path",
    "retire_secret",
    "rotate_secret",
    "secret_epoch_of",
    "secret_epoch_path",
    "secret_epochs",
    "secret_path",
    "write_private_key",
    "write_secret",
]

MIN_SECRET_BYTES = 32
SECRET_ENV_VAR = "JIGSAW_FEDERATION_SECRET"

_PUBLIC_KEY_BYTES = 32
# Words that mark a value copied from an example rather than generated.
_PLACEHOLDER_WORDS = (
    "changeme",
    "change-me",
    "change_me",
    "placeholder",
    "password",
    "example",
    "dummy",
    "insecure",
)
_HEX_RE = re.compile(r"(?:[0-9a-fA-F]{2})+")
# ``federation.<N>.key``: the secret of key epoch N (``federation.key`` is epoch 1).
_EPOCH_SECRET_RE = re.compile(r"federation\.([1-9][0-9]{0,8})\.key")


# --------------------------------------------------------------------------- layout


def secret_path(directory: Path) -> Path:
    """Where :func:`init_federation` puts the federation secret (for the nodes only)."""
    return Path(directory) / "secret" / "federation.key"


def secret_epoch_path(directory: Path, epoch: int) -> Path:
    """Where the secret of key epoch ``epoch`` lives: ``federation.key`` for epoch 1 (as
    :func:`init_federation` wrote it), ``federation.<epoch>.key`` after a rotation."""
    if epoch < 1:
        raise ValueError("a key epoch is a positive integer")
    return (
        secret_path(directory)
        if epoch == 1
        else secret_path(directory).with_name(f"federation.{epoch}.key")
    )


def secret_epoch_of(path: Path | str) -> int | None:
    """The key epoch a secret file's name states (``federation.<N>.key``), or None.

    ``federation.key`` and any other name state no epoch: for those the node's ``key_epoch``
    setting says which epoch the secret is.
    """
    match = _EPOCH_SECRET_RE.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def secret_epochs(directory: Path) -> dict[int, Path]:
    """The federation secrets under ``directory/secret/``, by key epoch (oldest first).

    Raises:
        ConfigError: If two files claim the same epoch (``federation.key`` and
            ``federation.1.key``).
    """
    folder = secret_path(directory).parent
    found: dict[int, Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir()):
        epoch = 1 if path.name == secret_path(directory).name else secret_epoch_of(path)
        if epoch is None:
            continue
        if epoch in found:
            raise ConfigError(
                f"two secret files for key epoch {epoch}: {found[epoch].name} and {path.name}",
                source=str(folder),
            )
        found[epoch] = path
    return dict(sorted(found.items()))


def keys_audit_path(directory: Path) -> Path:
    """The audit log of key rotations and retirements (a DuckDB file; no key material)."""
    return Path(directory) / "keys-audit.duckdb"


def matcher_key_path(directory: Path) -> Path:
    """Where :func:`init_federation` puts the matcher's private key."""
    return Path(directory) / "matcher" / "matcher.key"


def node_key_path(directory: Path, node_id: str) -> Path:
    """Where :func:`init_federation` puts node ``node_id``'s private key."""
    return Path(directory) / "nodes" / node_id / "node.key"


def registry_path(directory: Path) -> Path:
    """Where :func:`init_federation` writes the registry."""
    return Path(directory) / "registry.toml"


def _pub_path(path: Path) -> Path:
    return path.with_name(path.name + ".pub")


# --------------------------------------------------------------------------- files


def check_owner_only(path: Path) -> None:
    """Refuse a private key or secret file that group or others can access.

    Args:
        path: The file to check.

    Raises:
        ConfigError: If the file is missing, not a regular file, or has any group/other
            permission bit set (the message says how to fix it).
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise ConfigError(f"cannot read key file: {e.strerror}", source=str(path)) from e
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError("not a regular file", source=str(path))
    # Windows has no POSIX permission bits to check; there, rely on the ACLs.
    if os.name == "posix" and st.st_mode & 0o077:
        mode = stat.S_IMODE(st.st_mode)
        raise ConfigError(
            f"group or others may access this file (mode {mode:04o}); run: chmod 600 {path}",
            source=str(path),
        )


def _write_file(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    """Write ``data`` to ``path`` atomically with exactly ``mode``.

    A fresh parent directory is created 0700. The data goes to a private temporary file
    first, so the final name never exists with partial content or looser permissions.
    """
    path = Path(path)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                os.fchmod(f.fileno(), mode)
            if overwrite:
                os.replace(tmp, path)
            else:
                # link() fails if the name exists: no check-then-write race.
                os.link(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except FileExistsError as e:
        raise ConfigError(
            "already exists; refusing to overwrite (pass overwrite=True to replace it)",
            source=str(path),
        ) from e
    except OSError as e:
        raise ConfigError(f"cannot write file: {e.strerror}", source=str(path)) from e


# --------------------------------------------------------------------------- the secret


def generate_federation_secret() -> bytes:
    """Return a new random federation secret of :data:`MIN_SECRET_BYTES` bytes."""
    return secrets.token_bytes(MIN_SECRET_BYTES)


def _secret_problems(secret: bytes) -> list[str]:
    problems = []
    if len(secret) < MIN_SECRET_BYTES:
        problems.append(
            f"secret is too short ({len(secret)} bytes; at least {MIN_SECRET_BYTES} needed)"
        )
    if secret and len(set(secret)) == 1:
        problems.append("secret is one repeated byte (e.g. all zero): a placeholder")
    elif any(
        secret == (secret[:period] * (len(secret) // period + 1))[: len(secret)]
        for period in range(2, 9)
    ):
        problems.append("secret is a short repeated pattern: a placeholder")
    lowered = secret.lower()
    if any(word.encode() in lowered for word in _PLACEHOLDER_WORDS):
        problems.append("secret contains a placeholder word")
    return problems


def _decode_secret_text(text: str) -> bytes | None:
    """Decode base64 or hex (optionally prefixed ``base64:`` / ``hex:``); None if neither."""
    text = text.strip()
    try:
        if text.startswith("hex:"):
            return bytes.fromhex(text[4:])
        if text.startswith("base64:"):
            text = text[7:]
        elif _HEX_RE.fullmatch(text):
            # Unambiguous in practice: base64 of 32 random bytes ends in "=".
            return bytes.fromhex(text)
        text = text.replace("-", "+").replace("_", "/")  # accept the URL-safe alphabet too
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (ValueError, binascii.Error):
        return None


def write_secret(path: Path, secret: bytes, *, overwrite: bool = False) -> None:
    """Write a federation secret as base64 text to a 0600 file.

    Args:
        path: Destination; a missing parent directory is created 0700.
        secret: The secret (checked as :func:`load_secret` would).
        overwrite: Replace an existing file instead of refusing.

    Raises:
        ConfigError: If the secret is weak, the file exists (without ``overwrite``), or it
            cannot be written.
    """
    problems = _secret_problems(secret)
    if problems:
        raise ConfigError(problems, source=str(path))
    data = base64.b64encode(secret) + b"\n"
    _write_file(Path(path), data, mode=0o600, overwrite=overwrite)


def load_secret(
    path: Path | str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> bytes:
    """Load the federation secret from a file, or else from the environment.

    With ``path``, reads that file (base64 or hex text; it must be 0600). Without it,
    reads the :data:`SECRET_ENV_VAR` environment variable (base64 or hex). Either way the
    value may be prefixed ``base64:`` or ``hex:`` to remove any doubt about its encoding.

    Args:
        path: A secret file, or None to use the environment.
        environ: The environment to read (defaults to ``os.environ``; for tests).

    Returns:
        The secret bytes.

    Raises:
        ConfigError: If no secret is found, it cannot be decoded, or it is too short or a
            placeholder ("changeme", all zero, a repeated byte or pattern). Messages name the
            file or variable, never the value.
    """
    if path is not None:
        check_owner_only(Path(path))
        source = str(path)
        try:
            text = Path(path).read_text(encoding="ascii")
        except OSError as e:
            raise ConfigError(f"cannot read secret file: {e.strerror}", source=source) from e
        except UnicodeDecodeError:
            # ``from None``: the decode error carries the file's bytes, i.e. the secret.
            raise ConfigError("secret file is not base64 or hex text", source=source) from None
    else:
        env = os.environ if environ is None else environ
        source = f"${SECRET_ENV_VAR}"
        if not env.get(SECRET_ENV_VAR, "").strip():
            raise ConfigError(
                f"no federation secret: set {SECRET_ENV_VAR} or give a secret file",
                source=source,
            )
        text = env[SECRET_ENV_VAR]
    if any(word in text.lower() for word in _PLACEHOLDER_WORDS):
        raise ConfigError("secret is a placeholder; generate one", source=source)
    secret = _decode_secret_text(text)
    if secret is None:
        raise ConfigError("secret is neither base64 nor hex", source=source)
    problems = _secret_problems(secret)
    if problems:
        raise ConfigError(problems, source=source)
    return secret


# --------------------------------------------------------------------------- signing keys


def generate_keypair() -> Ed25519PrivateKey:
    """Return a new Ed25519 private key (its public key is ``key.public_key()``)."""
    return Ed25519PrivateKey.generate()


def write_private_key(path: Path, key: Ed25519PrivateKey, *, overwrite: bool = False) -> None:
    """Write a private key (PEM PKCS8, mode 0600) and its public key to ``<path>.pub`` (0644).

    Args:
        path: Destination of the private key; a missing parent directory is created 0700.
        key: The private key.
        overwrite: Replace existing files instead of refusing.

    Raises:
        ConfigError: If either file exists (without ``overwrite``) or cannot be written.
    """
    path = Path(path)
    pub = _pub_path(path)
    if not overwrite:
        # Check both first so that a refusal never leaves half a key pair behind.
        existing = [str(p) for p in (path, pub) if p.exists()]
        if existing:
            raise ConfigError(
                [f"{p} already exists; refusing to overwrite" for p in existing],
                source=str(path),
            )
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_file(path, private_pem, mode=0o600, overwrite=overwrite)
    _write_file(pub, public_pem, mode=0o644, overwrite=overwrite)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an unencrypted PEM (PKCS8) Ed25519 private key from an owner-only file.

    Args:
        path: The key file (must not be accessible by group or others).

    Returns:
        The private key.

    Raises:
        ConfigError: If the file is missing, too permissive, unreadable, or not an
            Ed25519 private key.
    """
    path = Path(path)
    check_owner_only(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read key file: {e.strerror}", source=str(path)) from e
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ConfigError(
            "not an unencrypted PEM (PKCS8) Ed25519 private key", source=str(path)
        ) from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError("not an Ed25519 private key", source=str(path))
    return key


def load_public_key(path_or_pem: Path | str) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file, or from PEM text.

    Args:
        path_or_pem: A path to a PEM file, or a string holding the PEM itself
            (recognised by its ``-----BEGIN`` line).

    Returns:
        The public key.

    Raises:
        ConfigError: If the file cannot be read or does not hold an Ed25519 public key.
    """
    if isinstance(path_or_pem, str) and "-----BEGIN" in path_or_pem:
        source, data = "<PEM text>", path_or_pem.encode("ascii", "replace")
    else:
        source = str(path_or_pem)
        try:
            data = Path(path_or_pem).read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read key file: {e.strerror}", source=source) from e
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ConfigError("not a PEM Ed25519 public key", source=source) from e
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError("not an Ed25519 public key", source=source)
    return key


def public_key_b64(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Return the registry form of a public key: base64 of its raw 32 bytes.

    Args:
        key: A public key, or a private key (whose public key is used).
    """
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(public.public_bytes_raw()).decode("ascii")


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    """Parse the registry form of a public key (base64 of its raw 32 bytes).

    Raises:
        ConfigError: If ``text`` is not base64 of exactly 32 bytes.
    """
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ConfigError("not valid base64") from e
    if len(raw) != _PUBLIC_KEY_BYTES:
        raise ConfigError(f"decodes to {len(raw)} bytes, an Ed25519 public key has 32")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as e:
        raise ConfigError("not an Ed25519 public key") from e


def public_key_fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Return a short fingerprint: the first 16 hex digits of SHA-256 of the raw public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return hashlib.sha256(public.public_bytes_raw()).hexdigest()[:16]


# --------------------------------------------------------------------------- a federation


@dataclass(frozen=True)
class KeyInfo:
    """A key file found by :func:`list_keys` (never its contents).

    Attributes:
        id: Party id (``"matcher"``, a node id, or ``"federation"`` for the secret).
        role: ``"matcher"``, ``"node"`` or ``"secret"``.
        fingerprint: Public key fingerprint (see :func:`public_key_fingerprint`); None for
            the secret, of which nothing is shown.
        path: The private key or secret file.
        epoch: For a secret, its key epoch; None for signing keys.
    """

    id: str
    role: Literal["matcher", "node", "secret"]
    fingerprint: str | None
    path: Path
    epoch: int | None = None


def init_federation(
    directory: Path,
    *,
    node_ids: Sequence[str],
    matcher_url: str,
    node_urls: Mapping[str, str],
    contacts: Mapping[str, Mapping[str, str]] | None = None,
    display_names: Mapping[str, str] | None = None,
) -> Path:
    """Create the keys and registry of a new federation under ``directory``.

    Creates ``secret/federation.key`` (for the nodes only: it is never put under
    ``matcher/``), ``matcher/matcher.key`` (+ ``.pub``), ``nodes/<id>/node.key`` (+ ``.pub``)
    and ``registry.toml``. Everything is validated, and every target checked to be absent,
    before anything is written.

    Args:
        directory: Where to create the federation (created if missing).
        node_ids: The county ids, ``[a-z0-9_-]``.
        matcher_url: Base URL of the matcher.
        node_urls: Base URL of every node, by id.
        contacts: Per node, a mapping with ``name``, ``email`` and ``phone``. Nodes without
            one get an obviously fictional contact (example.org, an Ofcom drama number),
            fine for a demo, to be replaced for real use.
        display_names: Per node, a human-readable name (default: from the id).

    Returns:
        The path of the registry file.

    Raises:
        ConfigError: Listing every problem (bad or duplicate ids, missing or extra URLs,
            bad contacts, files that already exist), or if a file cannot be written.
    """
    # Imported here: registry imports this module for the base64 key helpers.
    from federation.registry import Contact, NodeEntry, Registry, default_display_name

    directory = Path(directory)
    contacts = contacts or {}
    display_names = display_names or {}
    problems: list[str] = []
    ids = list(node_ids)
    if not ids:
        problems.append("node_ids is empty")
    seen: set[str] = set()
    for node_id in ids:
        if node_id in seen:
            problems.append(f"duplicate node id {node_id!r}")
        seen.add(node_id)
    problems += [f"no URL for node {n!r}" for n in ids if n not in node_urls]
    problems += [f"URL for unknown node {n!r}" for n in sorted(set(node_urls) - seen)]
    problems += [f"contact for unknown node {n!r}" for n in sorted(set(contacts) - seen)]
    problems += [f"display name for unknown node {n!r}" for n in sorted(set(display_names) - seen)]
    for node_id, fields in contacts.items():
        missing = sorted({"name", "email", "phone"} - set(fields))
        if missing:
            problems.append(f"contact for {node_id!r} lacks {', '.join(missing)}")
    if problems:
        raise ConfigError(problems, source=str(directory))

    matcher_key = generate_keypair()
    node_keys = {node_id: generate_keypair() for node_id in ids}
    nodes = {}
    for number, node_id in enumerate(ids):
        given = contacts.get(node_id)
        contact = (
            Contact(name=given["name"], email=given["email"], phone=given["phone"])
            if given is not None
            else _demo_contact(node_id, number)
        )
        nodes[node_id] = NodeEntry(
            node_id=node_id,
            url=node_urls[node_id],
            public_key=node_keys[node_id].public_key(),
            contact=contact,
            display_name=display_names.get(node_id) or default_display_name(node_id),
        )
    registry = Registry(
        matcher_url=matcher_url, matcher_public_key=matcher_key.public_key(), nodes=nodes
    )
    # Validate the registry (ids, URLs, contacts) before writing a single file.
    try:
        Registry.loads(registry.to_toml(), source=str(registry_path(directory)))
    except ConfigError as e:
        raise ConfigError(e.problems, source=str(directory)) from e

    targets = [secret_path(directory), registry_path(directory), matcher_key_path(directory)]
    targets += [node_key_path(directory, node_id) for node_id in ids]
    targets += [_pub_path(p) for p in targets[2:]]
    existing = [f"{p} already exists" for p in targets if p.exists()]
    if existing:
        raise ConfigError(existing, source=str(directory))

    directory.mkdir(parents=True, exist_ok=True)
    write_secret(secret_path(directory), generate_federation_secret())
    write_private_key(matcher_key_path(directory), matcher_key)
    for node_id in ids:
        write_private_key(node_key_path(directory, node_id), node_keys[node_id])
    registry.save(registry_path(directory))
    return registry_path(directory)


def _demo_contact(node_id: str, number: int) -> Contact:
    from federation.registry import Contact, default_display_name

    # 01632 960000-960999 is reserved by Ofcom for drama: it can never reach a real person.
    return Contact(
        name=f"{default_display_name(node_id)} safeguarding lead (example)",
        email=f"safeguarding.{node_id}@example.org",
        phone=f"01632 960{number % 1000:03d}",
    )


def list_keys(directory: Path) -> list[KeyInfo]:
    """List the key files of a federation laid out by :func:`init_federation`.

    Shows ids, roles, public key fingerprints and paths; never any private material. The
    secret file is listed (so an operator can see where it is) without a fingerprint.

    Args:
        directory: The federation directory.

    Returns:
        The matcher first, then nodes by id, then the secrets present, oldest epoch first
        (the last one is the current epoch).

    Raises:
        ConfigError: If ``directory`` does not exist or a key file cannot be read.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError("not a directory", source=str(directory))
    found: list[KeyInfo] = []
    matcher = matcher_key_path(directory)
    if matcher.exists():
        found.append(KeyInfo("matcher", "matcher", _fingerprint_of(matcher), matcher))
    nodes_dir = directory / "nodes"
    if nodes_dir.is_dir():
        for node_dir in sorted(p for p in nodes_dir.iterdir() if p.is_dir()):
            key_path = node_key_path(directory, node_dir.name)
            if key_path.exists():
                found.append(KeyInfo(node_dir.name, "node", _fingerprint_of(key_path), key_path))
    for epoch, secret in secret_epochs(directory).items():
        found.append(KeyInfo("federation", "secret", None, secret, epoch=epoch))
    return found


# --------------------------------------------------------------------------- key epochs


def rotate_secret(directory: Path, *, actor: str = "cli") -> tuple[int, Path]:
    """Open a new key epoch: write a fresh federation secret beside the current one.

    The current secret is kept: nodes go on using it until each is switched to the new file,
    and the matcher links on the old epoch until every node has re-tokenised under the new
    one. Retire the old secret (:func:`retire_secret`) once the matcher reports the switch.
    The rotation is recorded in :func:`keys_audit_path` (epochs and file names only).

    Args:
        directory: The federation directory (as made by :func:`init_federation`).
        actor: Who rotated, for the audit log.

    Returns:
        ``(epoch, path)`` of the new secret.

    Raises:
        ConfigError: If there is no current secret to rotate, or the new file exists.
        StoreError: If the audit log cannot be written (the new secret is written by then).
    """
    directory = Path(directory)
    epochs = secret_epochs(directory)
    if not epochs:
        raise ConfigError(
            "no federation secret to rotate (run `jigsaw keys init` first)",
            source=str(secret_path(directory).parent),
        )
    previous = max(epochs)
    epoch = previous + 1
    path = secret_epoch_path(directory, epoch)
    write_secret(path, generate_federation_secret())
    _audit_key_change(
        directory,
        "keys.rotated",
        actor,
        {
            "epoch": epoch,
            "previous_epoch": previous,
            "file": str(path.relative_to(directory)),
            "kept": [str(p.relative_to(directory)) for p in epochs.values()],
        },
    )
    return epoch, path


def retire_secret(directory: Path, epoch: int, *, actor: str = "cli") -> Path:
    """Delete the secret of an old key epoch (after the matcher has switched past it).

    Args:
        directory: The federation directory.
        epoch: The epoch to retire; never the current (newest) one.
        actor: Who retired it, for the audit log.

    Returns:
        The path deleted.

    Raises:
        ConfigError: If there is no such secret, or it is the current one.
        StoreError: If the audit log cannot be written (the secret is deleted by then).
    """
    directory = Path(directory)
    epochs = secret_epochs(directory)
    if epoch not in epochs:
        raise ConfigError(
            f"no secret of key epoch {epoch} here", source=str(secret_path(directory).parent)
        )
    if epoch == max(epochs):
        raise ConfigError(
            f"key epoch {epoch} is the current secret; rotate first, then retire the old one",
            source=str(epochs[epoch]),
        )
    path = epochs[epoch]
    try:
        path.unlink()
    except OSError as e:
        raise ConfigError(f"cannot delete: {e.strerror}", source=str(path)) from e
    _audit_key_change(
        directory,
        "keys.retired",
        actor,
        {"epoch": epoch, "file": str(path.relative_to(directory)), "current_epoch": max(epochs)},
    )
    return path


def _audit_key_change(directory: Path, event: str, actor: str, details: dict[str, object]) -> None:
    """Append a key change to the federation directory's hash-chained audit log."""
    path = keys_audit_path(directory)
    try:
        conn = duckdb.connect(str(path))
    except duckdb.Error as e:
        raise StoreError(f"cannot open the key audit log {path}") from e
    try:
        AuditLog(conn).append(event, actor, details)
    finally:
        conn.close()


def _fingerprint_of(private_path: Path) -> str:
    # Prefer the public half: reading it needs no access to the private key.
    pub = _pub_path(private_path)
    if pub.exists():
        return public_key_fingerprint(load_public_key(pub))
    return public_key_fingerprint(load_private_key(private_path))
