"""The autoloader agent: leases files, processes them with Spark, commits them to Iceberg.

Modules, one job each: config (settings), protocol (the lease RPCs with retries),
heartbeat (keeps a lease alive), staging (object-store files to local paths),
reader (Spark: files -> DataFrame with metadata columns), evolution (aligning a
batch to the table's schema), sink (Iceberg: staged Parquet -> one commit),
worker (the lease -> process -> report loop, with poison isolation).
"""

import os

# Before anything imports grpc: gRPC's fork handlers make a small share of forked children abort
# ("epoll_wait error: Bad file descriptor"), and pyspark forks to launch its JVM while our gRPC
# channels and servers are open. We never use gRPC in a forked child.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
