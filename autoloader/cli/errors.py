"""Turning failures into one readable message and a documented exit code.

Exit codes: 0 ok, 1 failed run or operation, 2 bad usage or bad input,
3 control plane (or its database) unavailable.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from autoloader.cli.output import err_console

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3

_BAD_INPUT = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE})
_UNAVAILABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class CliError(Exception):
    """A failure already phrased for a person, with its exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def exit_code_for(code: grpc.StatusCode) -> int:
    if code in _BAD_INPUT:
        return EXIT_BAD_INPUT
    if code in _UNAVAILABLE:
        return EXIT_UNAVAILABLE
    return EXIT_FAILED


def report_rpc_error(error: grpc.RpcError, address: str) -> int:
    code: grpc.StatusCode = error.code()
    details = error.details() or ""
    if code is grpc.StatusCode.UNAVAILABLE and "connect" in details.lower():
        err_console.print(
            f"error: cannot reach the control plane at {address}; is it running? "
            "(start one with `autoloader up`, or set --address / AUTOLOADER_ADDRESS)"
        )
        return EXIT_UNAVAILABLE
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    details_list = list(status.details) if status else []
    reason = ""
    for detail in details_list:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason if info.reason != code.name else ""
    err_console.print(f"error: {code.name}{f' ({reason})' if reason else ''}: {details}", markup=False)
    for detail in details_list:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if len(bad.field_violations) > 1:
                for violation in bad.field_violations:
                    err_console.print(f"  - {violation.field}: {violation.description}", markup=False)
    return exit_code_for(code)
