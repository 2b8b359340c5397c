"""Browser sessions for the web app: sign-in by API token, one-time sign-in links, CSRF tokens.

A session lives in the server's memory, keyed by a random id in an HttpOnly, SameSite=Strict cookie; a server
restart signs everyone out, which is what a local tool should do. A signed-in session remembers the API token it
was opened with, and every request checks that token again through the API's own authentication, so a revoked
token ends its sessions at once and a browser never holds more rights than the token.

Every form that changes something carries the session's CSRF token (``csrf_token``; scripts send it in the
``X-CSRF-Token`` header) and a POST without the matching token is refused with 403.

Only a successful sign-in creates a session, so anonymous requests, however many, hold no memory of the server
and can never push a signed-in user out. The sign-in form is protected without one: its CSRF token is a signed
value (HMAC with a key of this server process) that the form carries and a SameSite=Strict cookie repeats
(:meth:`Sessions.signin_token`); a POST needs both, equal and with a valid signature. Signing in issues a new
session id (no fixation). Each account keeps at most ``MAX_SESSIONS_PER_ACCOUNT`` sessions (its own oldest
end first); idle sessions are forgotten after ``SESSION_TTL_S``.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

COOKIE = "finetune_session"
SIGNIN_COOKIE = "finetune_signin"  # the sign-in form's CSRF value, repeated (no server-side state)
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SESSION_TTL_S = 12 * 3600  # idle time after which a session is forgotten
LINK_TTL_S = 15 * 60  # how long a one-time sign-in link stays valid
SIGNIN_TOKEN_TTL_S = 12 * 3600  # how long a sign-in form stays usable
MAX_SESSIONS_PER_ACCOUNT = 100  # signed-in browsers of one account; its own oldest end first


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

    def __init__(self, ttl_s: float = SESSION_TTL_S, max_per_account: int = MAX_SESSIONS_PER_ACCOUNT):
        self._ttl = ttl_s
        self._max_per_account = max_per_account
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently seen first
        self._links: dict[str, tuple[str, str, float]] = {}  # nonce -> (account, token, expires)
        self._lock = threading.Lock()
        self._key = secrets.token_bytes(32)  # signs sign-in form tokens; a restart makes old forms stale

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _new(self, account: str, token: str | None) -> Session:
        session = Session(id=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32), account=account, token=token)
        with self._lock:
            now = time.monotonic()
            while self._sessions:  # forget idle ones (the least recently seen come first)
                oldest = next(iter(self._sessions.values()))
                if now - oldest.last_seen <= self._ttl:
                    break
                self._sessions.popitem(last=False)
            self._sessions[session.id] = session
            mine = [s.id for s in self._sessions.values() if s.account == account]
            for sid in mine[:max(0, len(mine) - self._max_per_account)]:
                del self._sessions[sid]
        return session

    # ------------------------------------------------------------------ the sign-in form's CSRF token
    def _sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), "sha256").hexdigest()[:32]

    def signin_token(self) -> str:
        """A fresh CSRF value for the sign-in form (``issued.nonce.signature``); nothing is stored."""
        text = f"{int(time.time())}.{secrets.token_urlsafe(16)}"
        return f"{text}.{self._sign(text)}"

    def signin_token_ok(self, cookie: str | None, sent: str | None) -> bool:
        """Whether a sign-in POST carries the same valid, unexpired token in its cookie and its form."""
        if not cookie or not isinstance(sent, str) or not hmac.compare_digest(cookie.encode(), sent.encode()):
            return False
        text, _, signature = cookie.rpartition(".")
        issued = text.partition(".")[0]
        if not issued.isdigit() or not hmac.compare_digest(self._sign(text).encode(), signature.encode()):
            return False
        return 0 <= time.time() - int(issued) <= SIGNIN_TOKEN_TTL_S

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
        """A fresh signed-in session; the browser's old one (if any) is dropped so its id cannot be reused."""
        if old is not None:
            self.drop(old.id)
        return self._new(account, token)

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
