"""E-mail notices of new alerts: a link to the inbox and nothing else.

When ``smtp_host`` and ``notify_to`` are set, a :class:`Notifier` thread looks every
``notify_interval`` seconds for alerts that arrived since it last looked and, if there are
any, sends one short e-mail to ``notify_to``. The e-mail carries no personal data, no alert ids
and no counts: only the county's name and a link to its inbox, where a person signs in to read
the alerts. E-mail is not a safe channel for safeguarding details; the inbox is.

What has been notified is kept in the node's store (``inbox_notices``: one row, the
``received_at`` up to which alerts have been notified), so a restart neither repeats nor
skips a notice. A failed send is logged (its error class only) and retried at the next look.
"""

from __future__ import annotations

import logging
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from email.message import EmailMessage

import duckdb

from federation.errors import StoreError
from federation.node.store import NodeStore
from federation.settings import NodeSettings

__all__ = ["Notifier", "inbox_url", "notice_message"]

logger = logging.getLogger(__name__)

Send = Callable[[EmailMessage], None]


def inbox_url(settings: NodeSettings) -> str:
    """The inbox's address as people reach it (``inbox_url``, else the node's own)."""
    if settings.inbox_url:
        return settings.inbox_url.rstrip("/")
    host = settings.host
    if host in ("0.0.0.0", "::", ""):  # listening everywhere: name the machine instead
        host = socket.getfqdn()
    elif ":" in host:
        host = f"[{host}]"
    return f"{settings.scheme}://{host}:{settings.port}/inbox"


def notice_message(settings: NodeSettings, county_name: str) -> EmailMessage:
    """The notice: who it is from, who to, and a link to the inbox (no personal data)."""
    message = EmailMessage()
    message["Subject"] = f"New Jigsaw match alerts for {county_name}"
    message["From"] = settings.notify_from
    message["To"] = ", ".join(settings.notify_to)
    message.set_content(
        f"New match alerts have arrived in the Jigsaw inbox for {county_name}.\n\n"
        f"Sign in to read them:\n{inbox_url(settings)}\n\n"
        "This e-mail deliberately holds no details about any child or family.\n"
    )
    return message


class Notifier:
    """Sends an e-mail notice when new alerts have arrived.

    Args:
        store: The node's open store.
        settings: Node settings (``smtp_*``, ``notify_*``, ``inbox_url``).
        county_name: The county's display name, for the notice.
        send: How to send a message; by default over SMTP as the settings say.
        now: Time of creation, from which alerts count as new on a fresh store.

    Raises:
        StoreError: If its table cannot be created.
    """

    def __init__(
        self,
        store: NodeStore,
        settings: NodeSettings,
        *,
        county_name: str,
        send: Send | None = None,
        now: float | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.county_name = county_name
        self._send = send or self._smtp_send
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        now = time.time() if now is None else now
        with store.lock:
            try:
                store.conn.execute(
                    "CREATE TABLE IF NOT EXISTS inbox_notices ("
                    "id INTEGER PRIMARY KEY CHECK (id = 1), notified_until DOUBLE NOT NULL)"
                )
                # Alerts held before notices were first set up are not news.
                store.conn.execute(
                    "INSERT INTO inbox_notices SELECT 1, ? "
                    "WHERE NOT EXISTS (SELECT 1 FROM inbox_notices)",
                    [now],
                )
            except duckdb.Error as e:
                raise StoreError("cannot create the notices table") from e

    @property
    def enabled(self) -> bool:
        """Whether there is somewhere to send notices."""
        return bool(self.settings.smtp_host and self.settings.notify_to)

    def check_once(self) -> bool:
        """Send a notice if alerts arrived since the last one; return whether one was sent.

        Raises:
            StoreError: DuckDB failed.
            OSError, smtplib.SMTPException: The send failed (nothing is marked notified).
        """
        with self.store.lock:
            try:
                row = self.store.conn.execute(
                    "SELECT n.notified_until, max(a.received_at) FROM inbox_notices n "
                    "LEFT JOIN alerts a ON a.received_at > n.notified_until "
                    "AND a.body IS NOT NULL AND a.status = 'open' GROUP BY 1"
                ).fetchone()
            except duckdb.Error as e:
                raise StoreError("cannot read alerts for notices") from e
        if row is None or row[1] is None:
            return False
        newest = float(row[1])
        self._send(notice_message(self.settings, self.county_name))
        with self.store.lock:
            try:
                self.store.conn.execute(
                    "UPDATE inbox_notices SET notified_until = greatest(notified_until, ?)",
                    [newest],
                )
            except duckdb.Error as e:
                raise StoreError("cannot record the notice") from e
        logger.info("sent an inbox notice")
        return True

    def _smtp_send(self, message: EmailMessage) -> None:
        s = self.settings
        assert s.smtp_host is not None
        with smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=15) as smtp:
            if s.smtp_starttls:
                smtp.starttls(context=ssl.create_default_context())
            if s.smtp_username:
                password = s.smtp_password.get_secret_value() if s.smtp_password else ""
                smtp.login(s.smtp_username, password)
            smtp.send_message(message)

    # ------------------------------------------------------------------ thread

    def start(self) -> None:
        """Look for new alerts every ``notify_interval`` seconds, in a daemon thread."""
        if not self.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="inbox-notices", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (waits for a send in progress)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.settings.notify_interval):
            try:
                self.check_once()
            except (StoreError, OSError, smtplib.SMTPException) as e:
                # The class only: an SMTP error can quote addresses back.
                logger.warning("inbox notice not sent (%s); will retry", type(e).__name__)
