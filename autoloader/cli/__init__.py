"""The `autoloader` command line."""
