"""How a user is named in labels, /stuck and the pages (``user_label``)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

USER_LABEL_MODES = ("upn", "sam", "hash", "none")


def new_label_key() -> str:
    return secrets.token_hex(32)


@dataclass(frozen=True)
class UserLabeler:
    """``upn`` (falls back to the sAMAccountName), ``sam``, ``hash`` or ``none``.

    ``hash`` is an HMAC-SHA256 of the raw objectGUID under ``key``: stable for as long as the key is
    (configured as ``user_label_key`` or generated once and kept in the state file), and not
    reversible by someone who can read AD but not the key.
    """

    mode: str = "upn"
    key: str = ""

    @property
    def names_users(self) -> bool:
        return self.mode != "none"

    def label(self, sam: str, upn: str | None, object_guid: bytes) -> str | None:
        if self.mode == "upn":
            return upn or sam
        if self.mode == "sam":
            return sam
        if self.mode == "hash":
            return hmac.new(self.key.encode("utf-8"), object_guid, hashlib.sha256).hexdigest()[:16]
        return None
