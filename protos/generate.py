"""Generates the Python code for every .proto under protos/forgerpc/.

    python protos/generate.py            # rewrite the committed *_pb2*.py / .pyi files (make protos)
    python protos/generate.py --out DIR  # write them under DIR instead (the freshness test)

The generated files are committed so that users of the SDK need no protoc.
"""

import argparse
import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent


def proto_files() -> list[pathlib.Path]:
    return sorted((ROOT / "forgerpc").rglob("*.proto"))


def generate(out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # grpc_tools ships the well-known types (descriptor.proto, ...) next to protoc.
    import grpc_tools

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(p.relative_to(ROOT)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT)
    generate(parser.parse_args().out)
