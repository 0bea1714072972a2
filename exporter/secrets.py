"""The one secret mask: every configured secret, in every form it can take in a message, replaced by
``<secret>``.

A secret can reach a log line or an error message in more forms than the one configured: an ODBC
driver echoes the braced ``{...}`` value with ``}`` doubled, an HTTP library the percent-encoded
form, a ``repr()`` or a JSON document the backslash-escaped form. :class:`SecretMask` holds each
secret with those derived forms and replaces all of them in one pass, longest first, so a secret
that contains another is masked whole and the mask text itself is never masked again.

Secrets of any length are masked. One shorter than :data:`SHORT` characters is masked where it
stands as a token of its own (not inside a longer word): a leak shows it between delimiters
(``PWD=abc;``, ``'abc'``, ``user:abc@host``), while masking the letters ``ab`` inside every
"table" would garble each line and tell a reader which letters the password is made of.

Use::

    mask = SecretMask(config.secrets())     # or a source's own section.secrets()
    log.warning("bind failed: %s", mask.mask(str(exc)))

The log handler (exporter.logs) masks every line with the process-wide mask as a last line of
defence; sources mask their own error messages with the same class before they store them.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from collections.abc import Iterable

MASK = "<secret>"
SHORT = 8  # secrets shorter than this are masked as whole tokens only


def derived_forms(secret: str) -> set[str]:
    """The secret as written plus the forms libraries turn it into (never the empty string)."""
    doubled = secret.replace("}", "}}")  # inside ODBC braces
    forms = {
        secret,
        doubled,
        "{" + doubled + "}",
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote(secret),
        urllib.parse.quote_plus(secret),
        json.dumps(secret, ensure_ascii=False)[1:-1],
        json.dumps(secret)[1:-1],
        repr(secret)[1:-1],
    }
    forms.discard("")
    return forms


class SecretMask:
    """Replaces every known secret (and its derived forms) in a text. Thread-safe; cheap when empty."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._forms: frozenset[str] = frozenset()
        self._pattern: re.Pattern[str] | None = None
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Add more secrets (e.g. a key generated after start); empty values are ignored."""
        new_forms: set[str] = set()
        for secret in secrets:
            if secret:
                new_forms |= derived_forms(secret)
        with self._lock:
            if new_forms <= self._forms:
                return
            self._forms = self._forms | new_forms
            # Longest first: at any position the regex engine takes the first alternative that
            # matches, so a secret containing another is replaced as a whole.
            ordered = sorted(self._forms, key=lambda form: (-len(form), form))
            self._pattern = re.compile("|".join(_alternative(form) for form in ordered))

    def mask(self, text: str) -> str:
        """``text`` with every secret form replaced by ``<secret>`` (in one pass)."""
        pattern = self._pattern
        if pattern is None or not text:
            return text
        return pattern.sub(MASK, text)

    def __len__(self) -> int:
        return len(self._forms)

    def __repr__(self) -> str:
        return f"SecretMask({len(self._forms)} forms)"


def _alternative(form: str) -> str:
    escaped = re.escape(form)
    if len(form) >= SHORT:
        return escaped
    # Not glued to a letter or digit on a side where the form itself starts/ends with one.
    before = r"(?<!\w)" if re.match(r"\w", form) else ""
    after = r"(?!\w)" if re.search(r"\w$", form) else ""
    return before + escaped + after
