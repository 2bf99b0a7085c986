"""autoloader: incremental, effectively-once ingestion of files into Iceberg tables."""

import os

# Before anything imports grpc: gRPC's fork handlers make a small share of forked children abort
# ("epoll_wait error: Bad file descriptor"), and pyspark forks to launch its JVM while our gRPC
# channels and servers are open. We never use gRPC in a forked child.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = "0.1.0"
