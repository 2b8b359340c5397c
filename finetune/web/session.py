"""Browser sessions for the web app: sign-in by API token, one-time sign-in links, CSRF tokens.

A session lives in the server's memory, keyed by a random id in an HttpOnly, SameSite=Strict cookie; a server
restart signs everyone out, which is what a local tool should do. A signed-in session remembers the API token it
was opened with, and every request checks that token again through the API's own authentication, so a revoked
token ends its sessions at once and a browser never holds more rights than the token.

Every form that changes something carries the session's CSRF token (``csrf_token``; scripts send it in the
``X-CSRF-Token`` header) and a POST without the matching token is refused with 403. The sign-in form is
protected the same way by an anonymous session created when the form is shown; signing in issues a new session
id (no fixation).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

COOKIE = "finetune_session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SESSION_TTL_S = 12 * 3600  # idle time after which a session is forgotten
LINK_TTL_S = 15 * 60  # how long a one-time sign-in link stays valid
MAX_SESSIONS = 10_000  # the oldest are dropped first; anonymous sessions are cheap to make


@dataclass
class Session:
    id: str
    csrf: str
    account: str | None = None  # the signed-in account's name; None while anonymous
    token: str | None = None  # the API token it signed in with (checked again on every request)
    last_seen: float = field(default_factory=time.monotonic)
    flash: dict[str, str] | None = None  # a one-time notice for the next page ({"kind": "ok"|"bad", "text": ...})

    def csrf_ok(self, sent: str | None) -> bool:
        return bool(sent) and hmac.compare_digest(self.csrf.encode(), str(sent).encode())


class Sessions:
    """The server's sessions and pending one-time sign-in links (thread-safe; one per app)."""

    def __init__(self, ttl_s: float = SESSION_TTL_S, max_sessions: int = MAX_SESSIONS):
        self._ttl = ttl_s
        self._max = max_sessions
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._links: dict[str, tuple[str, str, float]] = {}  # nonce -> (account, token, expires)
        self._lock = threading.Lock()

    def new(self) -> Session:
        """An anonymous session (it carries a CSRF token for the sign-in form)."""
        session = Session(id=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32))
        with self._lock:
            self._sessions[session.id] = session
            while len(self._sessions) > self._max:
                self._sessions.popitem(last=False)
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return None
            now = time.monotonic()
            if now - session.last_seen > self._ttl:
                del self._sessions[session_id]
                return None
            session.last_seen = now
            self._sessions.move_to_end(session_id)
            return session

    def sign_in(self, old: Session | None, account: str, token: str) -> Session:
        """A fresh signed-in session; the old (anonymous) one is dropped so its id cannot be reused."""
        if old is not None:
            self.drop(old.id)
        session = self.new()
        session.account, session.token = account, token
        return session

    def drop(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def drop_token(self, token: str) -> None:
        """End every session opened with ``token`` (it was revoked or no longer authenticates)."""
        with self._lock:
            for sid in [s.id for s in self._sessions.values() if s.token == token]:
                del self._sessions[sid]

    def issue_link(self, account: str, token: str, ttl_s: float = LINK_TTL_S) -> str:
        """A one-time nonce that signs the browser that opens it in as ``account`` (``--open-browser``)."""
        nonce = secrets.token_urlsafe(32)
        with self._lock:
            self._links[nonce] = (account, token, time.monotonic() + ttl_s)
        return nonce

    def redeem_link(self, nonce: str) -> tuple[str, str] | None:
        """``(account, token)`` for a valid, unused nonce (which is then spent); None otherwise."""
        with self._lock:
            entry = self._links.pop(nonce, None)
        if entry is None or entry[2] < time.monotonic():
            return None
        return entry[0], entry[1]
