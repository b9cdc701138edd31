"""The safeguarding lead's inbox: server-rendered pages over the node's alerts.

Routes (HTML without JavaScript; every page but sign-in needs a session)::

    GET  /inbox                              alerts, newest first, filtered; what needs attention
    GET  /inbox/alerts/{alert_id}            one alert, re-identified locally (audited)
    POST /inbox/alerts/{alert_id}/decision   a clerical decision and a note (kept here)
    GET  /inbox/login, POST /inbox/login     sign in
    POST /inbox/logout                       sign out
    GET  /inbox/static/inbox.css             the stylesheet (no CDN, no web fonts)
    POST /v1/admin/users                     admin bearer token: add a user or reset a password

People sign in with a username and password (:mod:`federation.node.accounts`: argon2id
hashes, lock-out, sessions). The session id travels in a signed cookie (HttpOnly,
SameSite=Strict, Path=/inbox, Secure when TLS is on or ``inbox_secure_cookies`` is set); every
form carries the session's CSRF token, and the sign-in form a token matched against a cookie
of its own. A POST whose Origin is another site is refused too.

Refusals are uniform: any page without a live session answers 401 with the sign-in form
(whatever was wrong: no cookie, a forged one, an expired session); a failed sign-in answers
401 with the same message whether the name is unknown, the password wrong or the account
locked out; a form without its token answers 403. Logs say what happened, never who or why.

A decision goes the way ``POST /v1/alerts/{id}/feedback`` sends it: kept with its note in the
store, queued in the outbox as a signed ``feedback`` message for the matcher (which records it
as a clerical label and re-sends the cluster's alerts with a ``reviews`` entry, so that the
other counties see who reviewed it and what they decided; never the note). Every alert viewed,
every list shown and every sign-in is an entry in the node's audit log.

What a page shows of another county is only what the alert carries: its name, its
safeguarding contact from the registry, its review, and how each field compared (the model's
comparison levels in plain English); never its values.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import parse_qsl, urlencode, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import duckdb
import jinja2
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from federation.errors import AuthError, StoreError
from federation.node.accounts import (
    DEFAULT_HASH,
    AccountError,
    AccountPolicy,
    Accounts,
    Session,
    sign_session_id,
    unsign_session_id,
)
from federation.node.notify import Notifier
from federation.protocol import FeedbackBody

if TYPE_CHECKING:
    from federation.node.app import NodeContext

__all__ = ["InboxRuntime", "mount_inbox", "start_inbox", "stop_inbox"]

logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"
STATIC_PREFIX = "/inbox/static"
#: Cookie names; each node's own (``<name>_<node id>``), as cookies ignore ports and a
#: browser may hold sessions at two nodes on one host (the demo does).
SESSION_COOKIE = "jigsaw_session"
LOGIN_COOKIE = "jigsaw_login"
PAGE_SIZE = 50
MAX_FORM_BYTES = 64 * 1024
MAX_NOTE = 10_000
#: Cost of new password hashes (see :class:`~federation.node.accounts.Argon2Params`).
PASSWORD_HASH = DEFAULT_HASH

#: Headers on every inbox page: nothing loads from elsewhere, nothing runs, nothing is
#: cached or framed, and no address leaks onward.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not "no-referrer": browsers then send "Origin: null" on form posts, which are refused.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

DECISIONS = {
    "person": {
        "same": "Same child",
        "not_same": "Not the same child",
        "need_info": "Need more information",
    },
    "family": {
        "same": "Same family",
        "not_same": "Not the same family",
        "need_info": "Need more information",
    },
}
STATUS_OPTIONS = (
    ("open", "Open"),
    ("attention", "Needs attention"),
    ("reviewed", "Reviewed by your county"),
    ("reviewed_elsewhere", "Reviewed by another county"),
    ("withdrawn", "Withdrawn"),
    ("all", "All"),
)
KIND_OPTIONS = (("", "Both"), ("person", "Person"), ("family", "Family"))

FIELD_NAMES = {
    "given_name": "Given name",
    "family_name": "Family name",
    "date_of_birth": "Date of birth",
    "nhs_number": "NHS number",
    "sex": "Sex",
    "role": "Child or adult",
    "postcode": "Postcode",
}
#: The model's comparison-level labels (``linkage.model``) in plain English.
LEVEL_TEXT = {
    "identical": "identical",
    "identical, a common name": "identical (a common name, so it counts for less)",
    "very similar": "very similar",
    "similar": "similar",
    "different": "different",
    "missing": "not recorded by one of the counties",
    "missing on one side": "not recorded by one of the counties",
    "day and month swapped": "day and month swapped",
    "one of day, month or year differs": "one of day, month or year differs",
    "shares a current or previous family name": (
        "matches a current or previous family name on the other record"
    ),
    "same district": "same postcode district, different postcode",
}


# --------------------------------------------------------------------------- runtime


@dataclass
class InboxRuntime:
    """What the inbox holds while the node runs (``app.state.inbox``).

    Attributes:
        accounts: Users, sessions and lock-out.
        cookie_key: Key that signs session cookies (derived from the node's private key).
        secure_cookies: Whether cookies are marked Secure.
        session_cookie: Name of this node's session cookie.
        login_cookie: Name of this node's sign-in form cookie.
        county_name: This county's display name.
        notifier: E-mail notices of new alerts (idle unless SMTP is configured).
    """

    accounts: Accounts
    cookie_key: bytes
    secure_cookies: bool
    county_name: str
    notifier: Notifier
    session_cookie: str = SESSION_COOKIE
    login_cookie: str = LOGIN_COOKIE


def start_inbox(app: FastAPI, node: NodeContext) -> InboxRuntime:
    """Create the inbox's tables, derive its cookie key, start e-mail notices.

    Args:
        app: The node's app (``app.state.inbox`` is set).
        node: The open node.

    Returns:
        The runtime.

    Raises:
        StoreError: If the inbox's tables cannot be created.
    """
    s = node.settings
    policy = AccountPolicy(
        lockout_failures=s.inbox_lockout_failures,
        lockout_window=s.inbox_lockout_minutes * 60,
        session_idle=s.inbox_session_idle_minutes * 60,
        session_max=s.inbox_session_max_hours * 3600,
        password_hash=PASSWORD_HASH,
    )
    raw = node.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"jigsaw inbox session cookie/1"
    ).derive(raw)
    entry = node.registry.nodes.get(s.node_id)
    county_name = entry.display_name if entry is not None else s.node_id
    secure = s.inbox_secure_cookies if s.inbox_secure_cookies is not None else s.scheme == "https"
    runtime = InboxRuntime(
        accounts=Accounts(node.store, policy=policy),
        cookie_key=key,
        secure_cookies=secure,
        county_name=county_name,
        notifier=Notifier(node.store, s, county_name=county_name),
        session_cookie=f"{SESSION_COOKIE}_{s.node_id}",
        login_cookie=f"{LOGIN_COOKIE}_{s.node_id}",
    )
    runtime.notifier.start()
    app.state.inbox = runtime
    return runtime


def stop_inbox(app: FastAPI) -> None:
    """Stop e-mail notices and detach the runtime (before the store closes)."""
    runtime: InboxRuntime | None = getattr(app.state, "inbox", None)
    app.state.inbox = None
    if runtime is not None:
        runtime.notifier.stop()


def mount_inbox(app: FastAPI, *, admin: Callable[..., Any]) -> None:
    """Add the inbox's routes, stylesheet and error pages to the node's app.

    Args:
        app: The node's app.
        admin: The app's admin-bearer-token dependency (refuses with a uniform 401).
    """
    app.state.inbox = None
    app.add_exception_handler(_Page, _page_response)
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC_DIR), name="inbox-static")
    _routes(app, admin)


# --------------------------------------------------------------------------- rendering

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


class _Page(Exception):
    """Answer with this response (an error page, the sign-in form)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


async def _page_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, _Page)
    return exc.response


def _secure(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    return response


def _render(
    template: str,
    *,
    county_name: str,
    session: Session | None = None,
    status: int = 200,
    **context: Any,
) -> HTMLResponse:
    html = _env.get_template(template).render(
        county_name=county_name, static_prefix=STATIC_PREFIX, session=session, **context
    )
    response = HTMLResponse(html, status_code=status)
    _secure(response)
    return response


def _message(
    status: int, heading: str, message: str, county_name: str = "", session: Session | None = None
) -> _Page:
    return _Page(
        _render(
            "refused.html",
            county_name=county_name,
            session=session,
            status=status,
            title=heading,
            heading=heading,
            message=message,
        )
    )


def _refused(runtime: InboxRuntime | None) -> _Page:
    """The one 403 for a form without its token or from another site."""
    return _message(
        403,
        "Request refused",
        "The form could not be accepted. Go back to the inbox and try again.",
        runtime.county_name if runtime else "",
    )


def _sign_in_page(
    request: Request, runtime: InboxRuntime, *, status: int, next_path: str, failed: bool = False
) -> Response:
    token = request.cookies.get(runtime.login_cookie, "")
    if not (20 <= len(token) <= 100 and token.isascii()):
        token = secrets.token_urlsafe(24)
    response = _render(
        "login.html",
        county_name=runtime.county_name,
        status=status,
        title="Sign in",
        failed=failed,
        login_token=token,
        next=_safe_next(next_path),
        lockout_minutes=f"{runtime.accounts.policy.lockout_window / 60:g}",
    )
    response.set_cookie(
        runtime.login_cookie,
        token,
        max_age=3600,
        path="/inbox",
        secure=runtime.secure_cookies,
        httponly=True,
        samesite="strict",
    )
    return response


def _safe_next(path: str) -> str:
    """A local inbox path to go to after signing in (anything else becomes ``/inbox``)."""
    parts = urlsplit(path)
    if (
        parts.scheme
        or parts.netloc
        or not parts.path.startswith("/inbox")
        or "//" in path
        or "\\" in path
        or not path.isprintable()
        or len(path) > 500
    ):
        return "/inbox"
    return path


# --------------------------------------------------------------------------- requests


@dataclass
class _Visit:
    node: NodeContext
    runtime: InboxRuntime
    session: Session


def _context(request: Request) -> tuple[NodeContext, InboxRuntime]:
    node = request.app.state.node
    runtime: InboxRuntime | None = getattr(request.app.state, "inbox", None)
    if node is None or runtime is None:
        raise _message(503, "Not ready", "The inbox is starting or stopping; try again shortly.")
    return node, runtime


def _signed_in(request: Request) -> _Visit:
    """The visit of a signed-in user; otherwise the sign-in form with a 401."""
    node, runtime = _context(request)
    session = None
    cookie = request.cookies.get(runtime.session_cookie)
    if cookie:
        session_id = unsign_session_id(runtime.cookie_key, cookie)
        if session_id is not None:
            session = runtime.accounts.session(session_id)
    if session is None:
        if request.method == "GET":
            next_path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        else:
            next_path = request.url.path.removesuffix("/decision")
        logger.info("inbox: no session for %s %s", request.method, request.url.path)
        raise _Page(_sign_in_page(request, runtime, status=401, next_path=next_path))
    return _Visit(node, runtime, session)


Visit = Annotated[_Visit, Depends(_signed_in)]


async def _form(request: Request, runtime: InboxRuntime) -> dict[str, str]:
    """A URL-encoded form body, after checking it comes from this site."""
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise _refused(runtime)
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise _refused(runtime)
    raw = await request.body()
    if len(raw) > MAX_FORM_BYTES:
        raise _message(413, "Too long", "The form was too long.", runtime.county_name)
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise _refused(runtime) from None
    return dict(pairs)


def _check_csrf(visit: _Visit, form: Mapping[str, str]) -> None:
    given = form.get("csrf_token", "").encode()
    if not secrets.compare_digest(given, visit.session.csrf_token.encode()):
        logger.info("inbox: form refused (CSRF token)")
        raise _refused(visit.runtime)


def _set_session_cookie(response: Response, runtime: InboxRuntime, session: Session) -> None:
    response.set_cookie(
        runtime.session_cookie,
        sign_session_id(runtime.cookie_key, session.session_id),
        max_age=int(runtime.accounts.policy.session_max),
        path="/inbox",
        secure=runtime.secure_cookies,
        httponly=True,
        samesite="strict",
    )


def _redirect(url: str) -> Response:
    return _secure(RedirectResponse(url, status_code=303))


class UserRequest(BaseModel):
    """Body of ``POST /v1/admin/users``."""

    model_config = ConfigDict(extra="forbid")
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)
    replace: bool = False


# --------------------------------------------------------------------------- routes


def _routes(app: FastAPI, admin: Callable[..., Any]) -> None:
    @app.get("/inbox/login", include_in_schema=False)
    def login_page(request: Request) -> Response:
        _, runtime = _context(request)
        next_path = request.query_params.get("next", "/inbox")
        return _sign_in_page(request, runtime, status=200, next_path=next_path)

    @app.post("/inbox/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        node, runtime = _context(request)
        form = await _form(request, runtime)
        cookie = request.cookies.get(runtime.login_cookie, "")
        if not cookie or not secrets.compare_digest(
            form.get("login_token", "").encode(), cookie.encode()
        ):
            logger.info("inbox: sign-in form refused (login token)")
            raise _refused(runtime)
        next_path = _safe_next(form.get("next", "/inbox"))
        username, password = form.get("username", ""), form.get("password", "")
        return await run_in_threadpool(
            _sign_in, request, node, runtime, username, password, next_path
        )

    @app.post("/inbox/logout", include_in_schema=False)
    async def logout(request: Request, visit: Visit) -> Response:
        _check_csrf(visit, await _form(request, visit.runtime))
        await run_in_threadpool(_sign_out, visit)
        response = _redirect("/inbox/login")
        response.delete_cookie(visit.runtime.session_cookie, path="/inbox")
        return response

    @app.get("/inbox", include_in_schema=False)
    def inbox(visit: Visit, request: Request) -> Response:
        return _inbox_page(visit, request.query_params)

    @app.get("/inbox/alerts/{alert_id}", include_in_schema=False)
    def alert(visit: Visit, request: Request, alert_id: str) -> Response:
        return _alert_page(visit, alert_id, request.query_params.get("recorded"))

    @app.post("/inbox/alerts/{alert_id}/decision", include_in_schema=False)
    async def decide(request: Request, visit: Visit, alert_id: str) -> Response:
        form = await _form(request, visit.runtime)
        _check_csrf(visit, form)
        return await run_in_threadpool(_decide, visit, alert_id, form)

    @app.post("/v1/admin/users", status_code=201)
    async def add_user(request: Request, _: object = Depends(admin)) -> JSONResponse:
        node, runtime = _context(request)
        try:
            body = UserRequest.model_validate_json(await request.body())
        except ValidationError as e:
            problems = [
                {"loc": list(err["loc"]), "type": err["type"], "msg": err["msg"]}
                for err in e.errors(include_url=False, include_input=False, include_context=False)
            ]
            return JSONResponse({"detail": problems}, status_code=422)
        try:
            outcome = await run_in_threadpool(
                runtime.accounts.add_user, body.username, body.password, replace=body.replace
            )
        except AccountError as e:
            return JSONResponse({"detail": str(e)}, status_code=422)
        await run_in_threadpool(
            node.audit.append, f"user.{outcome}", "admin", {"username": body.username}
        )
        return JSONResponse({"username": body.username, "status": outcome}, status_code=201)


# --------------------------------------------------------------------------- handlers


def _sign_in(
    request: Request,
    node: NodeContext,
    runtime: InboxRuntime,
    username: str,
    password: str,
    next_path: str,
) -> Response:
    accounts = runtime.accounts
    try:
        name = accounts.authenticate(username, password)
    except AuthError as e:
        actor = f"user:{username.strip().lower()}" if accounts.is_user(username) else "anonymous"
        node.audit.append("inbox.sign_in_refused", actor, {"reason": e.reason})
        logger.info("inbox: sign-in refused")
        logger.debug("inbox: sign-in refused because: %s", e.reason)
        return _sign_in_page(request, runtime, status=401, next_path=next_path, failed=True)
    session = accounts.create_session(name)
    node.audit.append("inbox.signed_in", session.actor, {})
    logger.info("inbox: signed in")
    response = _redirect(next_path)
    _set_session_cookie(response, runtime, session)
    response.delete_cookie(runtime.login_cookie, path="/inbox")
    return response


def _sign_out(visit: _Visit) -> None:
    visit.runtime.accounts.end_session(visit.session.session_id)
    visit.node.audit.append("inbox.signed_out", visit.session.actor, {})
    logger.info("inbox: signed out")


def _inbox_page(visit: _Visit, query: Mapping[str, str]) -> Response:
    node, runtime = visit.node, visit.runtime
    own = node.settings.node_id
    others = {
        node_id: entry.display_name
        for node_id, entry in sorted(node.registry.nodes.items())
        if node_id != own
    }
    kind = query.get("kind", "")
    kind = kind if kind in ("person", "family") else ""
    status = query.get("status", "open")
    status = status if status in dict(STATUS_OPTIONS) else "open"
    county = query.get("county", "")
    county = county if county in others else ""
    try:
        page = max(1, int(query.get("page", "1")))
    except ValueError:
        page = 1

    viewed = runtime.accounts.viewed()
    items = [_summary(row, viewed, own, others) for row in node.store.inbox()]
    items.sort(key=lambda item: (-item["received_at"], item["alert_id"]))
    attention = sum(item["needs_attention"] for item in items)
    new_count = sum(item["state"] == "new" for item in items)
    chosen = [
        item
        for item in items
        if (not kind or item["kind"] == kind)
        and (not county or county in item["counties"])
        and _status_matches(item, status)
    ]
    pages = max(1, -(-len(chosen) // PAGE_SIZE))
    page = min(page, pages)
    rows = chosen[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    node.audit.append("inbox.listed", visit.session.actor, {"shown": len(rows)})

    def page_href(number: int) -> str:
        params = {"kind": kind, "status": status, "county": county, "page": str(number)}
        return "/inbox?" + urlencode({k: v for k, v in params.items() if v})

    if not chosen:
        shown_text = "No alerts"
    elif len(chosen) == 1:
        shown_text = "1 alert"
    else:
        shown_text = f"{len(chosen)} alerts"
    return _render(
        "inbox.html",
        county_name=runtime.county_name,
        session=visit.session,
        title="Match alerts",
        attention=attention,
        new_count=new_count,
        rows=rows,
        shown_text=shown_text,
        filters={"kind": kind, "status": status, "county": county},
        kind_options=KIND_OPTIONS,
        status_options=STATUS_OPTIONS,
        county_options=[("", "Any"), *others.items()],
        page=page,
        pages=pages,
        prev_href=page_href(page - 1) if page > 1 else None,
        next_href=page_href(page + 1) if page < pages else None,
    )


def _status_matches(item: Mapping[str, Any], status: str) -> bool:
    if status == "all":
        return True
    if status == "withdrawn":
        return bool(item["status"] == "withdrawn")
    if item["status"] != "open":
        return False
    if status == "attention":
        return bool(item["needs_attention"])
    if status == "reviewed":
        return item["decision"] is not None
    if status == "reviewed_elsewhere":
        return bool(item["reviews"])
    return True


def _summary(
    row: Mapping[str, Any], viewed: set[str], own: str, names: Mapping[str, str]
) -> dict[str, Any]:
    """One alert as a row of the list (and the state the list counts)."""
    body, records, kind = row["body"], row["records"], row["kind"]
    decision = row["feedback"][-1]["decision"] if row["feedback"] else None
    needs_attention = row["status"] == "open" and decision in (None, "need_info")
    if row["status"] == "withdrawn":
        state, label = "withdrawn", "Withdrawn"
    elif decision == "need_info":
        state, label = "attention", "Awaiting more information"
    elif decision is not None:
        state, label = "reviewed", f"Reviewed: {DECISIONS[kind][decision].lower()}"
    elif row["alert_id"] not in viewed:
        state, label = "new", "New"
    else:
        state, label = "attention", "Needs attention"
    if kind == "person":
        title = _name(records[0]) if records else "a record no longer held"
        reference = records[0]["record_id"] if records else "—"
    else:
        household = records[0]["household_id"] if records else None
        title = f"household {household}" if household else "a household no longer held"
        title += f" ({len(records)} {'person' if len(records) == 1 else 'people'})"
        reference = household or "—"
    county_names = {o["county"]: o["display_name"] for o in body["other_counties"]}
    reviews = [
        f"Reviewed by {county_names.get(r['county'], names.get(r['county'], r['county']))}: "
        f"{DECISIONS[kind][r['decision']].lower()}"
        for r in body.get("reviews", [])
        if r["county"] != own
    ]
    return {
        "alert_id": row["alert_id"],
        "href": f"/inbox/alerts/{row['alert_id']}",
        "kind": kind,
        "kind_label": "Person" if kind == "person" else "Family",
        "title": title,
        "reference": reference,
        "others": ", ".join(o["display_name"] for o in body["other_counties"]),
        "counties": set(county_names),
        "confidence": f"{_confidence(body['match_probability'])} "
        f"({_percent(body['match_probability'])})",
        "received_at": row["received_at"],
        "received": _when(row["received_at"]),
        "status": row["status"],
        "decision": decision,
        "needs_attention": needs_attention,
        "state": state,
        "state_label": label,
        "reviews": reviews,
    }


def _find(node: NodeContext, alert_id: str) -> dict[str, Any] | None:
    if not _is_hex(alert_id):
        return None
    # The store's inbox query re-identifies every alert; a county holds hundreds, not millions.
    for row in node.store.inbox():
        if row["alert_id"] == alert_id:
            return row
    return None


def _alert_page(visit: _Visit, alert_id: str, recorded: str | None) -> Response:
    node, runtime, session = visit.node, visit.runtime, visit.session
    row = _find(node, alert_id)
    if row is None:
        raise _message(
            404, "Alert not found", "There is no such alert.", runtime.county_name, session
        )
    runtime.accounts.record_view(alert_id, session.username)
    node.audit.append("alert.viewed", session.actor, {"alert_id": alert_id})
    own = node.settings.node_id
    body, kind, records = row["body"], row["kind"], row["records"]
    probability = float(body["match_probability"])
    summary = _summary(row, runtime.accounts.viewed(), own, {})
    reviews = {r["county"]: DECISIONS[kind][r["decision"]] for r in body.get("reviews", [])}
    household: list[dict[str, Any]] = []
    household_ref = None
    if records:
        household_ref = records[0]["household_id"]
        if kind == "person" and household_ref:
            household = [
                _record_view(r)
                for r in _household(node, household_ref, exclude=records[0]["record_id"])
            ]
    authors = runtime.accounts.decision_authors()
    sent = _sent(node, [f["feedback_id"] for f in row["feedback"]])
    decisions = [
        {
            "when": _when(f["created_at"]),
            "label": DECISIONS[kind].get(f["decision"], f["decision"]),
            "by": authors.get(f["feedback_id"], "administrator"),
            "note": f["note"],
            "sent": "Yes" if sent.get(f["feedback_id"]) == "acked" else "Waiting to send",
        }
        for f in reversed(row["feedback"])
    ]
    view = {
        "alert_id": alert_id,
        "kind": kind,
        "kind_label": "Person" if kind == "person" else "Family",
        "subject": "child" if kind == "person" else "family",
        "title": summary["title"],
        "status": row["status"],
        "state": summary["state"],
        "state_label": summary["state_label"],
        "withdrawal_reason": row["reason"] if row["status"] == "withdrawn" else None,
        "confidence_words": _confidence(probability),
        "probability": f"{probability:.6g}",
        "percent": _percent(probability),
        "received": _when(row["received_at"]),
        "updated": _when(row["updated_at"]),
        "cluster_id": row["cluster_id"],
        "records": [_record_view(r) for r in records],
        "household": household,
        "household_ref": household_ref,
        "others": [
            {
                **o,
                "contact_tel": "".join(c for c in o["contact_phone"] if c.isdigit() or c == "+"),
                "review": reviews.get(o["county"]),
            }
            for o in body["other_counties"]
        ],
        "own_review": reviews.get(own, "").lower() or None,
        "explanation": [_explain(item) for item in body["explanation"]],
        "decisions": decisions,
        "choices": list(DECISIONS[kind].items()),
        "decision_href": f"/inbox/alerts/{alert_id}/decision",
    }
    return _render(
        "alert.html",
        county_name=runtime.county_name,
        session=session,
        title=f"{view['kind_label']} alert",
        a=view,
        recorded=DECISIONS[kind].get(recorded or "", "").lower() or None,
    )


def _decide(visit: _Visit, alert_id: str, form: Mapping[str, str]) -> Response:
    node, runtime, session = visit.node, visit.runtime, visit.session
    decision, note = form.get("decision", ""), form.get("note", "")
    if decision not in ("same", "not_same", "need_info") or len(note) > MAX_NOTE:
        raise _message(
            400,
            "Decision not recorded",
            "Choose one of the three answers (and keep the note under 10,000 characters).",
            runtime.county_name,
            session,
        )
    status = _alert_status(node, alert_id) if _is_hex(alert_id) else None
    if status is None:
        raise _message(
            404, "Alert not found", "There is no such alert.", runtime.county_name, session
        )
    if status != "open":
        raise _message(
            409,
            "Alert withdrawn",
            "This alert was withdrawn, so no decision is needed.",
            runtime.county_name,
            session,
        )
    body = FeedbackBody.model_validate(
        {
            "feedback_id": secrets.token_hex(16),
            "alert_id": alert_id,
            "county": node.settings.node_id,
            "decision": decision,
        }
    )
    stored = node.store.add_feedback(
        feedback_id=body.feedback_id,
        alert_id=alert_id,
        decision=decision,
        note=note,
        body=body.model_dump_json(by_alias=True),
    )
    if not stored:
        raise _message(
            404, "Alert not found", "There is no such alert.", runtime.county_name, session
        )
    runtime.accounts.record_decision(body.feedback_id, session.username)
    node.audit.append(
        "feedback.queued",
        session.actor,
        {"feedback_id": body.feedback_id, "alert_id": alert_id, "decision": decision},
    )
    logger.info("inbox: decision on alert %s queued as %s", alert_id, body.feedback_id)
    node.publisher.wake()
    return _redirect(f"/inbox/alerts/{alert_id}?recorded={decision}")


# --------------------------------------------------------------------------- store reads


def _query(node: NodeContext, what: str, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    store = node.store
    with store.lock:
        if not store.is_open:
            raise StoreError(f"cannot {what}: the node store is closed")
        try:
            return store.conn.execute(sql, params).fetchall()
        except duckdb.Error as e:
            raise StoreError(f"cannot {what}") from e


def _household(node: NodeContext, household_id: str, *, exclude: str) -> list[dict[str, Any]]:
    rows = _query(
        node,
        "read the household",
        "SELECT record_id, household_id, active, display FROM records "
        "WHERE household_id = ? AND record_id <> ? ORDER BY active DESC, record_id",
        [household_id, exclude],
    )
    return [
        {"record_id": r[0], "household_id": r[1], "active": bool(r[2]), **json.loads(r[3])}
        for r in rows
    ]


def _sent(node: NodeContext, feedback_ids: list[str]) -> dict[str, str]:
    if not feedback_ids:
        return {}
    marks = ", ".join("?" for _ in feedback_ids)
    rows = _query(
        node,
        "read the outbox",
        f"SELECT message_id, status FROM outbox WHERE message_id IN ({marks})",
        list(feedback_ids),
    )
    return {str(m): str(s) for m, s in rows}


def _alert_status(node: NodeContext, alert_id: str) -> str | None:
    rows = _query(
        node,
        "read the alert",
        "SELECT status FROM alerts WHERE alert_id = ? AND body IS NOT NULL",
        [alert_id],
    )
    return str(rows[0][0]) if rows else None


# --------------------------------------------------------------------------- wording


def _is_hex(text: str) -> bool:
    return 8 <= len(text) <= 64 and all(c in "0123456789abcdef" for c in text)


def _confidence(probability: float) -> str:
    """The match probability in words."""
    if probability >= 0.999:
        return "Almost certain"
    if probability >= 0.99:
        return "Very likely"
    if probability >= 0.9:
        return "Likely"
    if probability >= 0.5:
        return "Possible"
    return "Unlikely"


def _percent(probability: float) -> str:
    """A percentage that never rounds up to 100% unless it is 100%."""
    text = ""
    for places in (1, 2, 3, 4):
        text = f"{probability * 100:.{places}f}"
        if probability >= 1 or float(text) < 100:
            break
    return f"{text}%"


def _explain(item: Mapping[str, Any]) -> dict[str, str]:
    """One comparison as a line of plain English."""
    field, level, weight = str(item["field"]), str(item["level"]), float(item["weight"])
    text = LEVEL_TEXT.get(level, level)
    if field in ("sex", "role") and level == "identical":
        text = "the same"
    if level.startswith("missing"):
        evidence = "no evidence either way"
    elif weight >= 4:
        evidence = "strong evidence of a match"
    elif weight >= 1:
        evidence = "supports a match"
    elif weight > -1:
        evidence = "little evidence either way"
    elif weight > -4:
        evidence = "counts against a match"
    else:
        evidence = "strong evidence against a match"
    label = FIELD_NAMES.get(field, field.replace("_", " ").capitalize())
    return {"field": label, "level": text, "evidence": evidence}


def _name(record: Mapping[str, Any]) -> str:
    parts = [record.get("given_name"), record.get("middle_names"), record.get("family_name")]
    name = " ".join(str(p) for p in parts if p)
    return name or f"record {record.get('record_id', '')}".strip()


_SEX = {"F": "Female", "M": "Male"}


def _record_view(record: Mapping[str, Any]) -> dict[str, Any]:
    nhs = record.get("nhs_number") or ""
    if len(nhs) == 10 and nhs.isdigit():
        nhs = f"{nhs[:3]} {nhs[3:6]} {nhs[6:]}"
    return {
        "name": _name(record),
        "date_of_birth": _date(record.get("date_of_birth")),
        "sex": _SEX.get(str(record.get("sex") or ""), "Not recorded"),
        "role": str(record.get("role") or "not recorded").capitalize(),
        "nhs_number": nhs or "Not recorded",
        "postcode": record.get("postcode") or "",
        "address": record.get("address") or "Not recorded",
        "record_id": record.get("record_id"),
        "household_id": record.get("household_id"),
        "active": bool(record.get("active", True)),
    }


def _date(value: Any) -> str:
    if not value:
        return "Not recorded"
    try:
        day = date.fromisoformat(str(value))
    except ValueError:
        return str(value)
    return f"{day.day} {day:%B %Y}"


def _zone() -> tzinfo:
    try:
        return ZoneInfo("Europe/London")
    except (ZoneInfoNotFoundError, ValueError):
        return UTC


_LONDON = _zone()


def _when(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, UTC).astimezone(_LONDON)
    return f"{moment.day} {moment:%b %Y, %H:%M} {moment.tzname()}"
