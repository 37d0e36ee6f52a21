"""Errors that leave a service as a canonical gRPC status plus one google.rpc.ErrorInfo.

Servicers raise `ServiceError` (or call `require`); the runtime turns it into a status whose
message is short and developer-facing and whose ErrorInfo `reason` is UPPER_SNAKE_CASE
(AIP-193). Anything else that escapes a servicer becomes INTERNAL without a traceback.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "forgerpc.dev"


class ServiceError(Exception):
    """A failure with a canonical status code, an ErrorInfo reason and metadata.

    Args:
        code: canonical status, e.g. grpc.StatusCode.INVALID_ARGUMENT.
        reason: UPPER_SNAKE_CASE machine-readable reason, e.g. "FIELD_INVALID".
        message: short, actionable, developer-facing text.
        metadata: extra key/value pairs for ErrorInfo (e.g. {"field": "items[0].response"}).
    """

    def __init__(self, code: grpc.StatusCode, reason: str, message: str, **metadata: str):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = {k: str(v) for k, v in metadata.items()}

    def to_status(self) -> grpc.Status:
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
        detail = any_pb2.Any()
        detail.Pack(info)
        proto = status_pb2.Status(
            code=getattr(code_pb2, self.code.name), message=self.message, details=[detail]
        )
        return rpc_status.to_status(proto)


def invalid_argument(field: str, problem: str) -> ServiceError:
    """INVALID_ARGUMENT naming the offending field, e.g. ("items[2].response", "must not be empty")."""
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT, "FIELD_INVALID", f"{field}: {problem}", field=field
    )


def require(condition: bool, field: str, problem: str) -> None:
    """Raises INVALID_ARGUMENT for `field` unless `condition` holds."""
    if not condition:
        raise invalid_argument(field, problem)


def not_found(what: str, message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, f"{what.upper()}_NOT_FOUND", message)


def failed_precondition(reason: str, message: str, **metadata: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, reason, message, **metadata)


def resource_exhausted(reason: str, message: str, **metadata: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, reason, message, **metadata)


def unimplemented(service: str, subject: str) -> ServiceError:
    """For the RPCs of a service that is not built yet: say which issue will build it."""
    return ServiceError(
        grpc.StatusCode.UNIMPLEMENTED,
        "NOT_BUILT_YET",
        f"{service} is not built yet (planned in: {subject})",
        service=service,
    )
