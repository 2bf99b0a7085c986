"""The autoloader agent: leases files, processes them with Spark, commits to Iceberg.

Empty until the leasing API lands; the package exists so the layout and the
type checker cover it from the start.
"""
