"""The long-lived Spark session an agent works with."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from agent.config import AgentSettings

log = logging.getLogger(__name__)


# Set on local and Spark Connect sessions alike.
SESSION_CONF = {
    # Iceberg stores timestamps as microseconds; Spark's default INT96 is not readable by pyiceberg.
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    # Partition values (day, hour) and _ingested_at are computed in UTC, as Iceberg does.
    "spark.sql.session.timeZone": "UTC",
    # A batch names its files one by one; past 32 paths Spark would list them in a Spark job
    # of its own, twice per batch (inference and read), where the driver takes milliseconds.
    "spark.sql.sources.parallelPartitionDiscovery.threshold": "100000",
}


def spark_session(settings: AgentSettings) -> Any:
    """Spark Connect when AUTOLOADER_SPARK_REMOTE is set, else a local (or master-URL) session."""
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(f"autoloader-agent-{settings.agent_name}")
    if settings.spark_remote:
        session = builder.remote(settings.spark_remote).getOrCreate()
        for key, value in SESSION_CONF.items():
            session.conf.set(key, value)
        return session
    # Python workers (the bucket-partitioning UDF) run this interpreter, with our packages.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    for key, value in SESSION_CONF.items():
        builder = builder.config(key, value)
    session = (
        builder.master(settings.spark_master)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "8")
        .config("spark.driver.memory", os.environ.get("AUTOLOADER_SPARK_DRIVER_MEMORY", "2g"))
        .getOrCreate()
    )
    # Failures reach our log as the errors of the files they belong to.
    session.sparkContext.setLogLevel("OFF")
    return session
