"""The Python SDK: a thin, retrying client over the autoloader.v1 gRPC API.

Every mutating call carries a request id (generated when not given), so
retrying it after UNAVAILABLE or a lost reply can never apply it twice.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import grpc
from google.protobuf.field_mask_pb2 import FieldMask

from autoloader.v1 import ingestion_pb2 as pb
from autoloader.v1 import ingestion_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
R = TypeVar("R")


class Client:
    """Connects lazily; use as a context manager or call close()."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 4,
    ) -> None:
        self.address = address
        self._channel = grpc.insecure_channel(address)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout
        self._retries = retries
        self.ingestions = ingestion_pb2_grpc.IngestionServiceStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., R], request: object) -> R:
        delay = 0.2
        for attempt in range(self._retries + 1):
            try:
                return method(request, timeout=self._timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if exc.code() not in _RETRYABLE or attempt == self._retries:
                    raise
                time.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311 - jitter, not crypto
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    # Ingestions

    def create_ingestion(
        self, ingestion: pb.Ingestion, ingestion_id: str = "", request_id: str | None = None
    ) -> pb.Ingestion:
        request = pb.CreateIngestionRequest(
            ingestion=ingestion, ingestion_id=ingestion_id, request_id=request_id or str(uuid.uuid4())
        )
        return self._call(self.ingestions.CreateIngestion, request).ingestion

    def get_ingestion(self, name: str) -> pb.Ingestion:
        return self._call(self.ingestions.GetIngestion, pb.GetIngestionRequest(name=ingestion_name(name))).ingestion

    def list_ingestions(self, filter: str = "", page_size: int = 0) -> Iterator[pb.Ingestion]:
        """Yields every ingestion matching filter, fetching pages as needed."""
        token = ""
        while True:
            request = pb.ListIngestionsRequest(page_size=page_size, page_token=token, filter=filter)
            page = self._call(self.ingestions.ListIngestions, request)
            yield from page.ingestions
            token = page.next_page_token
            if not token:
                return

    def update_ingestion(
        self, ingestion: pb.Ingestion, paths: Sequence[str], request_id: str | None = None
    ) -> pb.Ingestion:
        request = pb.UpdateIngestionRequest(
            ingestion=ingestion, update_mask=FieldMask(paths=list(paths)), request_id=request_id or str(uuid.uuid4())
        )
        return self._call(self.ingestions.UpdateIngestion, request).ingestion

    def delete_ingestion(self, name: str, drop_table: bool = False, etag: str = "") -> None:
        request = pb.DeleteIngestionRequest(
            name=ingestion_name(name), drop_table=drop_table, etag=etag, request_id=str(uuid.uuid4())
        )
        self._call(self.ingestions.DeleteIngestion, request)

    def pause_ingestion(self, name: str) -> pb.Ingestion:
        request = pb.PauseIngestionRequest(name=ingestion_name(name), request_id=str(uuid.uuid4()))
        return self._call(self.ingestions.PauseIngestion, request).ingestion

    def resume_ingestion(self, name: str) -> pb.Ingestion:
        request = pb.ResumeIngestionRequest(name=ingestion_name(name), request_id=str(uuid.uuid4()))
        return self._call(self.ingestions.ResumeIngestion, request).ingestion


def ingestion_name(name_or_id: str) -> str:
    """Accepts "orders" or "ingestions/orders"."""
    return name_or_id if name_or_id.startswith("ingestions/") else f"ingestions/{name_or_id}"
