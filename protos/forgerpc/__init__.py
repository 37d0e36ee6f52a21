"""forgerpc: RL post-training of language models as gRPC microservices.

The package is assembled from the repository's top-level folders (see pyproject.toml):
``forgerpc.v1`` (generated protobuf code), ``forgerpc.clients`` (the SDK),
``forgerpc.services`` (servers) and ``forgerpc.orchestrator`` (apps and the CLI).
"""

__version__ = "0.1.0"
