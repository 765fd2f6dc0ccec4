"""Helpers for tests that talk to the service over a real gRPC channel with the raw stubs."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


def status_details(status: status_pb2.Status) -> tuple[error_details_pb2.ErrorInfo, list[str]]:
    """(the one ErrorInfo, BadRequest field names) of a google.rpc.Status (AIP-193)."""
    infos, fields = [], []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend(v.field for v in bad.field_violations)
    assert len(infos) == 1, f"expected exactly one ErrorInfo, got {infos}"
    assert infos[0].domain == "turnid"
    return infos[0], fields


def error_details(
    error: grpc.aio.AioRpcError | grpc.RpcError,
) -> tuple[grpc.StatusCode, error_details_pb2.ErrorInfo, list[str]]:
    """(code, the one ErrorInfo, BadRequest field names) of a failed call (AIP-193)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the error carries no google.rpc.Status"
    info, fields = status_details(status)
    return error.code(), info, fields
