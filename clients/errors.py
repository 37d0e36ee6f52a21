"""One typed exception for every failed call: `ForgeRPCError(code, reason, message, details)`."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


class ForgeRPCError(Exception):
    """A call that failed, as the server (or the transport) reported it.

    Attributes:
        code: canonical grpc.StatusCode.
        reason: ErrorInfo reason (UPPER_SNAKE_CASE) when the server sent one, else the code's name.
        message: the server's developer-facing message.
        details: ErrorInfo metadata, e.g. {"field": "items[0].response"}.
        method: full RPC name, e.g. "/forgerpc.v1.RewardService/Evaluate".
        address: the replica that answered.
    """

    def __init__(self, code: grpc.StatusCode, reason: str, message: str,
                 details: dict[str, str] | None = None, method: str = "", address: str = ""):
        super().__init__(f"{code.name} {reason}: {message}" + (f" ({method} @ {address})" if method else ""))
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details or {}
        self.method = method
        self.address = address

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, method: str = "", address: str = "") -> "ForgeRPCError":
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        message = (error.details() if hasattr(error, "details") else str(error)) or ""
        trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
        status_details = next((value for key, value in trailing or () if key == _DETAILS_KEY), b"")
        return cls.from_status(code, message, status_details, method, address)

    @classmethod
    def from_status(cls, code: grpc.StatusCode, message: str, status_details: bytes = b"",
                    method: str = "", address: str = "") -> "ForgeRPCError":
        """From a call's status, message and `grpc-status-details-bin` (a google.rpc.Status)."""
        reason, details = code.name, {}
        if status_details:
            for any_detail in status_pb2.Status.FromString(status_details).details:
                info = error_details_pb2.ErrorInfo()
                if any_detail.Unpack(info):
                    reason, details = info.reason, dict(info.metadata)
        return cls(code, reason, message, details, method, address)
