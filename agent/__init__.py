"""The autoloader agent: leases files, processes them with Spark, commits them to Iceberg.

Modules, one job each: config (settings), protocol (the lease RPCs with retries),
heartbeat (keeps a lease alive), staging (object-store files to local paths),
reader (Spark: files -> DataFrame with metadata columns), evolution (aligning a
batch to the table's schema), sink (Iceberg: staged Parquet -> one commit),
worker (the lease -> process -> report loop, with poison isolation).
"""

# Before anything imports grpc: the package sets gRPC's fork handling (see autoloader/__init__.py).
import autoloader  # noqa: F401
