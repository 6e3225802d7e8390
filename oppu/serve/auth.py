"""API keys: which users' personal models a key may use.

The keys file is JSON, `{"<key>": ["<user id>", ...], ...}`; `"*"` in a key's list allows every user (an
operator's key). Without a keys file the server is open (it binds 127.0.0.1 by default). With one, every request
needs `Authorization: Bearer <key>`; the base model and the task-adapted bases are open to every valid key, a
personal model only to the keys that list its user. Another user's model is refused (403), never answered by the
base instead.
"""

from __future__ import annotations

import hmac
import json
from pathlib import Path

from oppu.errors import OppuError

ANY_USER = "*"


class AuthError(OppuError, PermissionError):
    """A missing or unknown key (401), or a key asking for another user's model (403)."""

    def __init__(self, message: str, status: int, code: str):
        super().__init__(message)
        self.status = status
        self.code = code


class KeysFileError(OppuError, ValueError):
    """The keys file is not what `--api-keys` expects."""


class ApiKeys:
    """Keys -> the user ids they may use."""

    def __init__(self, keys: dict[str, list[str]] | None):
        self.keys = None if keys is None else {str(k): frozenset(map(str, v)) for k, v in keys.items()}

    @classmethod
    def from_file(cls, path: str | Path | None) -> ApiKeys:
        if path is None:
            return cls(None)
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise KeysFileError(f"cannot read the API keys file {path}: {exc}") from exc
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()) or not data:
            raise KeysFileError(f"{path} must be a non-empty JSON object mapping each key to a list of user ids, "
                                'e.g. {"sk-alice": ["alice"]}')
        if any(len(k) < 8 for k in data):
            raise KeysFileError(f"{path}: every key must be at least 8 characters long")
        return cls(data)

    @property
    def enabled(self) -> bool:
        return self.keys is not None

    def users_of(self, authorization: str | None) -> frozenset[str] | None:
        """The users the request's key may use (None: no keys configured, anything goes); AuthError (401)
        for a missing or unknown key. Every key is compared in constant time."""
        if self.keys is None:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("no API key: send `Authorization: Bearer <key>`", 401, "invalid_api_key")
        token = token.strip()
        found = None
        for key, users in self.keys.items():
            if hmac.compare_digest(key.encode(), token.encode()):
                found = users
        if found is None:
            raise AuthError("the API key is not valid for this server", 401, "invalid_api_key")
        return found

    @staticmethod
    def check(users: frozenset[str] | None, model) -> None:
        """AuthError (403) when `model` is a personal model of a user the key does not list."""
        if users is None or model.kind != "user" or ANY_USER in users or str(model.user_id) in users:
            return
        raise AuthError(f"this API key may not use the personal model {model.id!r}: it belongs to another user",
                        403, "model_forbidden")

    @staticmethod
    def visible(users: frozenset[str] | None, model) -> bool:
        return users is None or model.kind != "user" or ANY_USER in users or str(model.user_id) in users
