"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP status
the official clients map to their exception classes (400 BadRequestError, 401 AuthenticationError,
403 PermissionDeniedError, 404 NotFoundError, 413 APIStatusError)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
         500: "server_error", 503: "server_error"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# pydantic names the member of a union it tried (`literal['auto']`, `int`, `constrained-float`)
# in the error's location; the caller's field is the path before it.
_UNION_TAGS = {"int", "float", "str", "bool", "dict", "list", "none"}


def _field(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and (part in _UNION_TAGS or any(c in part for c in "[]'-(")):
            break
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def from_validation(exc: ValidationError) -> OpenAIError:
    """A 400 naming every bad field of a request body (a union's alternatives joined with `or`),
    the first one as `param`."""
    problems: dict[str, list[str]] = {}
    for err in exc.errors(include_url=False):
        message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"][:1].lower() + err["msg"][1:]
        problems.setdefault(_field(err["loc"]) or "body", []).append(message)
    detail = "; ".join(f"{where}: {' or '.join(dict.fromkeys(msgs))}" for where, msgs in problems.items())
    first = next(iter(problems), None)
    return OpenAIError(400, "invalid request: " + detail, param=first if first != "body" else None,
                       code="invalid_request")


def not_found(what: str, ident: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(404, f"No such {what}: {ident}", param=param, code="not_found")
