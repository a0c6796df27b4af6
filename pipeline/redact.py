"""Redaction in one place: every string that leaves the process or reaches disk passes `redact`.

API keys come from the environment and must never reach stderr, logs, the store, datasets or
config dumps, even when a server or proxy quotes the request back ("Authorization: Bearer sk-...")
or a base URL carries credentials (`http://user:secret@host`). `redact` removes:
- every key value read through `remember_secret` (the teacher registers its key when it reads it),
- anything shaped like a bearer token, an `sk-...` key, or `api_key=...` in a query string,
- the password (and user) part of a URL.

The set of remembered values is process-wide on purpose: a secret read anywhere must be hidden
everywhere, and passing it down to every logger and error would be easy to forget once.
"""

from __future__ import annotations

import logging
import re

MASK = "***"

_secrets: set[str] = set()

_PATTERNS = [
    # "Bearer abc", "Authorization: Basic abc", JSON-quoted or not
    (re.compile(r"(?i)\b(bearer|basic)(\s+|%20)[A-Za-z0-9._~+/=\-]{6,}"), rf"\1\2{MASK}"),
    # OpenAI/Anthropic/OpenRouter-style keys wherever they appear
    (re.compile(r"\b(sk|rk|pk)-[A-Za-z0-9_\-]{8,}"), f"{MASK}"),
    # api_key=..., access_token: ..., x-api-key: ... in query strings, headers or JSON bodies
    (
        re.compile(
            r"(?i)\b(api[_-]?key|access[_-]?token|x-api-key)([\"']?\s*[=:]\s*[\"']?)[^\s\"'&,;}]{6,}"
        ),
        rf"\1\2{MASK}",
    ),
    # Google-style keys (?key=AIza...)
    (re.compile(r"\bAIza[0-9A-Za-z_\-]{20,}"), MASK),
    # credentials in a URL: scheme://user:password@host -> scheme://***@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s:@]*:[^/\s@]*@"), rf"\1{MASK}@"),
]


def remember_secret(value: str | None) -> None:
    """Hide this exact value from every string redacted from now on (keys of 4+ characters)."""
    if value and len(value) >= 4:
        _secrets.add(value)


def redact(text: str) -> str:
    """`text` with remembered secrets, bearer tokens, key-shaped strings and URL credentials masked."""
    if not text:
        return text
    for s in sorted(_secrets, key=len, reverse=True):  # longest first: one key may contain another
        text = text.replace(s, MASK)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's final message (attach to every handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True
