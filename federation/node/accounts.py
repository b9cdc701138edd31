"""Inbox accounts: safeguarding leads' passwords, sessions, CSRF tokens and lock-out.

Tables, in the node's DuckDB file (through :class:`~federation.node.store.NodeStore`'s
``conn`` and ``lock``)::

    inbox_users           username PK, password_hash (argon2id), created_at, changed_at
    inbox_sessions        session_hash PK (SHA-256 of the id; the id is only in the cookie),
                          username, csrf_token, created_at, last_seen_at
    inbox_login_failures  who (SHA-256 of the name as typed), failed_at
    inbox_views           alert_id PK, first_viewed_at, first_viewed_by
    inbox_decisions       feedback_id PK, username (who recorded a clerical decision)

Passwords are hashed with argon2id, a memory-hard function (:data:`DEFAULT_HASH`). A sign-in
fails the same way, taking about the same time, whether the name is unknown, the password is
wrong or the account is locked out (:attr:`AccountPolicy.lockout_failures` failures within
:attr:`AccountPolicy.lockout_window` seconds); the cause goes into
:attr:`~federation.errors.AuthError.reason` only. Failures are counted by a hash of the name as
typed, so a password typed into the name box is never stored.

A session lasts until it has been idle for :attr:`AccountPolicy.session_idle` seconds or has
lived :attr:`AccountPolicy.session_max` seconds. Its id travels in a cookie, signed with a key
the node derives from its own private key (:func:`sign_session_id`); each session has its own
CSRF token that every form carries.

Errors (see :mod:`federation.errors`)::

    FederationError
    ├── AuthError      sign-in refused (always "request refused")
    ├── StoreError     DuckDB failed
    └── AccountError   a username or password that breaks the rules, or a duplicate name
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from federation.audit import AuditLog
from federation.errors import AuthError, FederationError, StoreError
from federation.node.store import NodeStore

__all__ = [
    "DEFAULT_HASH",
    "USERNAME_RE",
    "AccountError",
    "AccountPolicy",
    "Accounts",
    "Argon2Params",
    "Session",
    "add_user_to_database",
    "check_new_password",
    "sign_session_id",
    "unsign_session_id",
]

#: What a username must look like (it appears in audit entries as ``user:<name>``).
USERNAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{1,63}")
#: Shortest password accepted.
MIN_PASSWORD_LENGTH = 12
#: Longest password accepted (argon2 takes any length; this only bounds the work).
MAX_PASSWORD_LENGTH = 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox_users (
    username VARCHAR PRIMARY KEY,
    password_hash VARCHAR NOT NULL,
    created_at DOUBLE NOT NULL,
    changed_at DOUBLE NOT NULL
);
CREATE TABLE IF NOT EXISTS inbox_sessions (
    session_hash VARCHAR PRIMARY KEY,
    username VARCHAR NOT NULL,
    csrf_token VARCHAR NOT NULL,
    created_at DOUBLE NOT NULL,
    last_seen_at DOUBLE NOT NULL
);
CREATE TABLE IF NOT EXISTS inbox_login_failures (
    who VARCHAR NOT NULL,
    failed_at DOUBLE NOT NULL
);
CREATE TABLE IF NOT EXISTS inbox_views (
    alert_id VARCHAR PRIMARY KEY,
    first_viewed_at DOUBLE NOT NULL,
    first_viewed_by VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS inbox_decisions (
    feedback_id VARCHAR PRIMARY KEY,
    username VARCHAR NOT NULL
);
"""


class AccountError(FederationError):
    """A username or password that breaks the rules, or a name already taken.

    The message says which rule, never the value given.
    """


@dataclass(frozen=True)
class Argon2Params:
    """Cost of the argon2id password hash.

    The default is OWASP's first recommended configuration (46 MiB of memory, one pass, one
    lane): about a tenth of a second on a small server. Hashes keep their own parameters, so
    raising these re-hashes each password at its owner's next sign-in.

    Attributes:
        time_cost: Passes over memory.
        memory_kib: Memory in KiB.
        parallelism: Lanes.
    """

    time_cost: int = 1
    memory_kib: int = 47_104
    parallelism: int = 1

    def hasher(self) -> PasswordHasher:
        """An argon2id hasher with these parameters."""
        return PasswordHasher(
            time_cost=self.time_cost, memory_cost=self.memory_kib, parallelism=self.parallelism
        )


DEFAULT_HASH = Argon2Params()


@dataclass(frozen=True)
class AccountPolicy:
    """Lock-out, session lifetimes and password hashing of the inbox.

    Attributes:
        lockout_failures: Failed sign-ins within ``lockout_window`` that lock a name out.
        lockout_window: Seconds over which failures count; a lock lifts as they age out.
        session_idle: Seconds of inactivity after which a session ends.
        session_max: Seconds after which a session ends however active.
        password_hash: Cost of the password hash.
    """

    lockout_failures: int = 5
    lockout_window: float = 15 * 60.0
    session_idle: float = 30 * 60.0
    session_max: float = 10 * 3600.0
    password_hash: Argon2Params = field(default_factory=Argon2Params)


@dataclass(frozen=True)
class Session:
    """A signed-in safeguarding lead.

    Attributes:
        session_id: The secret id (only ever in the cookie and in memory).
        username: Who signed in.
        csrf_token: The token every form of this session must carry.
        created_at: When the session began.
    """

    session_id: str
    username: str
    csrf_token: str
    created_at: float

    @property
    def actor(self) -> str:
        """This user as an audit-log actor."""
        return f"user:{self.username}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class Accounts:
    """The inbox's users, sessions, lock-out and who-did-what, in the node's store.

    Args:
        store: The node's open store (its ``conn`` and ``lock`` are shared).
        policy: Lock-out, session lifetimes and hash cost.

    Raises:
        StoreError: If the tables cannot be created.
    """

    def __init__(self, store: NodeStore, *, policy: AccountPolicy | None = None) -> None:
        self.store = store
        self.policy = policy or AccountPolicy()
        self._hasher = self.policy.password_hash.hasher()
        self._decoy: str | None = None
        with self._locked("create the account tables") as conn:
            conn.execute(_SCHEMA)

    @contextmanager
    def _locked(self, what: str) -> Iterator[duckdb.DuckDBPyConnection]:
        with self.store.lock:
            if not self.store.is_open:
                raise StoreError(f"cannot {what}: the node store is closed")
            try:
                yield self.store.conn
            except duckdb.Error as e:
                raise StoreError(f"cannot {what}") from e

    # ------------------------------------------------------------------ users

    def add_user(
        self, username: str, password: str, *, replace: bool = False, now: float | None = None
    ) -> str:
        """Create a user, or with ``replace`` set a new password (which also lifts a lock-out
        and ends the user's sessions).

        Args:
            username: ``[a-z0-9][a-z0-9._-]{1,63}``.
            password: At least :data:`MIN_PASSWORD_LENGTH` characters, not the username.
            replace: Allow replacing an existing user's password.
            now: Time; defaults to ``time.time()``.

        Returns:
            ``"created"`` or ``"replaced"``.

        Raises:
            AccountError: The username or password breaks a rule, or the user exists and
                ``replace`` is false.
            StoreError: DuckDB failed.
        """
        check_new_password(username, password)
        now = time.time() if now is None else now
        hashed = self._hasher.hash(password)
        with self._locked("add the user") as conn:
            exists = conn.execute(
                "SELECT 1 FROM inbox_users WHERE username = ?", [username]
            ).fetchone()
            if exists and not replace:
                raise AccountError(
                    'that user already exists (use --replace, or "replace": true, to set a '
                    "new password)"
                )
            conn.begin()
            try:
                if exists:
                    conn.execute(
                        "UPDATE inbox_users SET password_hash = ?, changed_at = ? "
                        "WHERE username = ?",
                        [hashed, now, username],
                    )
                    conn.execute("DELETE FROM inbox_sessions WHERE username = ?", [username])
                else:
                    conn.execute(
                        "INSERT INTO inbox_users VALUES (?, ?, ?, ?)",
                        [username, hashed, now, now],
                    )
                conn.execute("DELETE FROM inbox_login_failures WHERE who = ?", [_digest(username)])
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
        return "replaced" if exists else "created"

    def usernames(self) -> list[str]:
        """Every user's name, sorted."""
        with self._locked("read users") as conn:
            rows = conn.execute("SELECT username FROM inbox_users ORDER BY 1").fetchall()
        return [str(r[0]) for r in rows]

    def authenticate(self, username: str, password: str, *, now: float | None = None) -> str:
        """Check a sign-in; return the username, or count a failure and refuse.

        Args:
            username: As typed (compared case-insensitively, after trimming).
            password: As typed.
            now: Time; defaults to ``time.time()``.

        Returns:
            The user's name.

        Raises:
            AuthError: Unknown name, wrong password or locked out (the same error whichever;
                the cause is in ``reason``).
            StoreError: DuckDB failed.
        """
        now = time.time() if now is None else now
        name = username.strip().lower()[:64]
        who = _digest(name)
        since = now - self.policy.lockout_window
        with self._locked("check the sign-in") as conn:
            row = conn.execute(
                "SELECT password_hash FROM inbox_users WHERE username = ?", [name]
            ).fetchone()
            failures = conn.execute(
                "SELECT count(*) FROM inbox_login_failures WHERE who = ? AND failed_at > ?",
                [who, since],
            ).fetchall()[0][0]
        if row is not None:
            stored = str(row[0])
        else:
            # A real hash to verify against, so that an unknown name takes as long to refuse
            # as a wrong password.
            if self._decoy is None:
                self._decoy = self._hasher.hash(secrets.token_urlsafe(16))
            stored = self._decoy
        # Verify on every path (outside the lock: it takes a tenth of a second), so that the
        # time taken does not tell an unknown or locked-out name from a wrong password.
        fits = len(password) <= MAX_PASSWORD_LENGTH  # no stored password is longer
        ok = self._verify(stored, password if fits else "") and fits and row is not None
        reason = None
        if int(failures) >= self.policy.lockout_failures:
            reason = "locked out"
        elif row is None:
            reason = "unknown user"
        elif not ok:
            reason = "wrong password"
        rehashed = (
            self._hasher.hash(password)
            if reason is None and self._hasher.check_needs_rehash(stored)
            else None
        )
        with self._locked("record the sign-in") as conn:
            if reason is not None:
                conn.execute("DELETE FROM inbox_login_failures WHERE failed_at <= ?", [since])
                conn.execute("INSERT INTO inbox_login_failures VALUES (?, ?)", [who, now])
                raise AuthError(reason)
            conn.execute("DELETE FROM inbox_login_failures WHERE who = ?", [who])
            if rehashed is not None:
                conn.execute(
                    "UPDATE inbox_users SET password_hash = ? WHERE username = ?", [rehashed, name]
                )
        return name

    def is_user(self, username: str) -> bool:
        """Whether ``username`` (as typed) names a user."""
        with self._locked("read users") as conn:
            row = conn.execute(
                "SELECT 1 FROM inbox_users WHERE username = ?", [username.strip().lower()[:64]]
            ).fetchone()
        return row is not None

    def _verify(self, stored: str, password: str) -> bool:
        try:
            return bool(self._hasher.verify(stored, password))
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    # ------------------------------------------------------------------ sessions

    def create_session(self, username: str, *, now: float | None = None) -> Session:
        """Start a session for a signed-in user (and sweep expired ones).

        Returns:
            The session, with its secret id and CSRF token.
        """
        now = time.time() if now is None else now
        session = Session(secrets.token_urlsafe(32), username, secrets.token_urlsafe(32), now)
        with self._locked("start the session") as conn:
            self._sweep(conn, now)
            conn.execute(
                "INSERT INTO inbox_sessions VALUES (?, ?, ?, ?, ?)",
                [_digest(session.session_id), username, session.csrf_token, now, now],
            )
        return session

    def session(self, session_id: str, *, now: float | None = None) -> Session | None:
        """The live session with this id (its idle clock restarted), or None.

        A session ends when idle too long, too old, or its user no longer exists.
        """
        now = time.time() if now is None else now
        key = _digest(session_id)
        with self._locked("read the session") as conn:
            row = conn.execute(
                "SELECT s.username, s.csrf_token, s.created_at, s.last_seen_at "
                "FROM inbox_sessions s JOIN inbox_users u USING (username) "
                "WHERE s.session_hash = ?",
                [key],
            ).fetchone()
            if row is None:
                return None
            username, csrf = str(row[0]), str(row[1])
            created_at, last_seen = float(row[2]), float(row[3])
            idle, age = now - last_seen, now - created_at
            if idle > self.policy.session_idle or age > self.policy.session_max:
                conn.execute("DELETE FROM inbox_sessions WHERE session_hash = ?", [key])
                return None
            if now - last_seen > 30:  # a write per page view would be wasted work
                conn.execute(
                    "UPDATE inbox_sessions SET last_seen_at = ? WHERE session_hash = ?", [now, key]
                )
        return Session(session_id, username, csrf, created_at)

    def end_session(self, session_id: str) -> None:
        """End a session (signing out)."""
        with self._locked("end the session") as conn:
            conn.execute("DELETE FROM inbox_sessions WHERE session_hash = ?", [_digest(session_id)])

    def _sweep(self, conn: duckdb.DuckDBPyConnection, now: float) -> None:
        conn.execute(
            "DELETE FROM inbox_sessions WHERE last_seen_at < ? OR created_at < ?",
            [now - self.policy.session_idle, now - self.policy.session_max],
        )

    # ------------------------------------------------------------------ who did what

    def record_view(self, alert_id: str, username: str, *, now: float | None = None) -> None:
        """Note that an alert has been opened at this county (the first time counts)."""
        now = time.time() if now is None else now
        with self._locked("record the view") as conn:
            conn.execute(
                "INSERT INTO inbox_views VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                [alert_id, now, username],
            )

    def viewed(self) -> set[str]:
        """Ids of the alerts opened at least once at this county."""
        with self._locked("read views") as conn:
            return {str(r[0]) for r in conn.execute("SELECT alert_id FROM inbox_views").fetchall()}

    def record_decision(self, feedback_id: str, username: str) -> None:
        """Note who recorded a clerical decision."""
        with self._locked("record the decision") as conn:
            conn.execute("INSERT INTO inbox_decisions VALUES (?, ?)", [feedback_id, username])

    def decision_authors(self) -> dict[str, str]:
        """Feedback id -> the user who recorded it."""
        with self._locked("read decisions") as conn:
            rows = conn.execute("SELECT feedback_id, username FROM inbox_decisions").fetchall()
        return {str(f): str(u) for f, u in rows}


def check_new_password(username: str, password: str) -> None:
    """Check a new username and password against the rules.

    Raises:
        AccountError: Naming every rule broken (never the values).
    """
    problems = []
    if not USERNAME_RE.fullmatch(username):
        problems.append(
            "the username must be 2 to 64 characters: lower-case letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    if len(password) < MIN_PASSWORD_LENGTH:
        problems.append(f"the password must be at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        problems.append(f"the password must be at most {MAX_PASSWORD_LENGTH} characters")
    if password.strip().lower() == username.strip().lower():
        problems.append("the password must not be the username")
    if problems:
        raise AccountError("; ".join(problems))


def add_user_to_database(
    database: Path, username: str, password: str, *, replace: bool = False, actor: str = "cli"
) -> str:
    """Add (or with ``replace`` reset) a user in a stopped node's store file, audited.

    Args:
        database: The node's DuckDB file (``NodeSettings.database``).
        username: The new user's name.
        password: The password.
        replace: Allow replacing an existing user's password.
        actor: Who did it, for the audit log.

    Returns:
        ``"created"`` or ``"replaced"``.

    Raises:
        AccountError: The username or password breaks a rule, or the user exists.
        StoreError: The store cannot be opened (e.g. the node is running and holds it).
    """
    store = NodeStore(database)
    try:
        outcome = Accounts(store).add_user(username, password, replace=replace)
        AuditLog(store.conn, lock=store.lock).append(
            f"user.{outcome}", actor, {"username": username}
        )
        return outcome
    finally:
        store.close()


# --------------------------------------------------------------------------- cookies


def sign_session_id(key: bytes, session_id: str) -> str:
    """The cookie value for a session id: ``<id>.<HMAC-SHA256 of it>`` (URL-safe base64)."""
    mac = hmac.new(key, session_id.encode("ascii"), hashlib.sha256).digest()
    return f"{session_id}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode('ascii')}"


def unsign_session_id(key: bytes, value: str) -> str | None:
    """The session id in a cookie value, if its signature is good; else None."""
    session_id, _, _ = value.rpartition(".")
    if not session_id or len(value) > 200 or not value.isascii():
        return None
    expected = sign_session_id(key, session_id)
    return session_id if hmac.compare_digest(expected.encode(), value.encode()) else None
