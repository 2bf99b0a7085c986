"""Generated autoloader.v1 gRPC stubs (see scripts/generate_protos.py); do not edit *_pb2* files."""
