"""The receiver's errors: each carries the HTTP status and the stable code the API returns.

    ReceiverError
    ├── InvalidSignature        401 invalid_signature
    ├── Unauthorized            401 unauthorized
    ├── NotFound                404 not_found
    ├── MethodNotAllowed        405 method_not_allowed
    ├── RequestTimeout          408 request_timeout   (the body did not arrive in time)
    ├── PayloadTooLarge         413 payload_too_large
    ├── HeadersTooLarge         431 headers_too_large
    ├── UnsupportedMediaType    415 unsupported_media_type
    ├── InvalidJson             400 invalid_json
    ├── InvalidPayload          422 invalid_payload   (the delivery is kept as rejected)
    ├── InvalidQuery            422 invalid_query
    ├── InvalidRule             422 invalid_rule
    ├── NotReplayable           409 not_replayable    (the archive kept no body)
    ├── Conflict                409 conflict          (e.g. an alert rule name in use)
    └── Unavailable             503 unavailable       (with Retry-After)

The same ``code`` is what the delivery archive records as a rejection cause.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ReceiverError(Exception):
    """Base of every error the API turns into ``{"error": {...}}``."""

    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, details: list[Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []
        # Set when the request was archived: lets an operator find and replay it.
        self.delivery_id: int | None = None

    def to_body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "details": self.details,
        }
        if self.delivery_id is not None:
            error["delivery_id"] = self.delivery_id
        return {"error": error}


class InvalidSignature(ReceiverError):
    status_code = 401
    code = "invalid_signature"


class Unauthorized(ReceiverError):
    status_code = 401
    code = "unauthorized"


class NotFound(ReceiverError):
    status_code = 404
    code = "not_found"


class MethodNotAllowed(ReceiverError):
    status_code = 405
    code = "method_not_allowed"


class RequestTimeout(ReceiverError):
    status_code = 408
    code = "request_timeout"


class PayloadTooLarge(ReceiverError):
    status_code = 413
    code = "payload_too_large"


class HeadersTooLarge(ReceiverError):
    status_code = 431
    code = "headers_too_large"


class UnsupportedMediaType(ReceiverError):
    status_code = 415
    code = "unsupported_media_type"


class InvalidJson(ReceiverError):
    status_code = 400
    code = "invalid_json"


class InvalidPayload(ReceiverError):
    status_code = 422
    code = "invalid_payload"


class InvalidQuery(ReceiverError):
    status_code = 422
    code = "invalid_query"


class NotReplayable(ReceiverError):
    status_code = 409
    code = "not_replayable"


class InvalidRule(ReceiverError):
    status_code = 422
    code = "invalid_rule"


class Conflict(ReceiverError):
    status_code = 409
    code = "conflict"


class Unavailable(ReceiverError):
    status_code = 503
    code = "unavailable"
    retry_after_seconds: ClassVar[int] = 5
