"""autoloader: incremental, effectively-once ingestion of files into Iceberg tables."""

__version__ = "0.1.0"
