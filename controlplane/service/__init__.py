"""Use cases. Each public method opens one Unit of Work and commits it, or lets it roll back."""
