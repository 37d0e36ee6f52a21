"""Generated protobuf and gRPC code for the forgerpc.v1 contract (`make protos`)."""
