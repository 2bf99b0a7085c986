"""gRPC servicers: proto <-> service calls, nothing else."""
