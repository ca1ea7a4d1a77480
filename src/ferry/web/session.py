"""Who may use the console: a one-time launch token, session cookies and CSRF tokens.

Theory of operation: ``ferry web`` prints one URL carrying a random launch
token, the way Jupyter does. The first request that shows it spends it and
gets a session: a random id sent back as an HttpOnly, SameSite=Strict cookie
(never readable by page scripts, never sent by another site), and a CSRF
token that the pages put in every form and in htmx's request headers. A POST
must carry its session's CSRF token and come from this origin (the server
checks ``Origin`` and ``Host`` too). Every comparison of a secret uses
:func:`hmac.compare_digest`. Nothing here is stored on disk: a restarted
``ferry web`` prints a new URL.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

TOKEN_BYTES = 32


def _secret() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


@dataclass(frozen=True)
class Session:
    id: str  # the cookie's value
    csrf: str  # what every POST of this session carries

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.csrf.encode())


class Sessions:
    """The launch token and the sessions it opened (in memory, for one server run)."""

    def __init__(self, launch_token: str | None = None) -> None:
        self._launch: str | None = launch_token or _secret()
        self._sessions: list[Session] = []

    @property
    def launch_token(self) -> str | None:
        """The token for the printed URL; ``None`` once it has been spent."""
        return self._launch

    def redeem(self, token: str | None) -> Session | None:
        """A new session for the launch token, which is then spent; else ``None``."""
        launch = self._launch
        if token is None or launch is None:
            return None
        if not hmac.compare_digest(token.encode(), launch.encode()):
            return None
        self._launch = None
        session = Session(id=_secret(), csrf=_secret())
        self._sessions.append(session)
        return session

    def find(self, cookie: str | None) -> Session | None:
        """The session whose id the cookie holds (compared in constant time)."""
        if not cookie:
            return None
        found = None
        for session in self._sessions:  # no early exit: every id is compared
            if hmac.compare_digest(cookie.encode(), session.id.encode()):
                found = session
        return found


def cookie_name(port: int) -> str:
    """Cookies ignore ports, so two consoles on one machine need different names."""
    return f"ferry_session_{port}"
