"""The contract: generated code is fresh, and the protos follow the Buf/AIP naming rules."""

from __future__ import annotations

import filecmp
import pathlib
import subprocess
import sys

import pytest
from google.protobuf import descriptor_pb2

from conftest import ROOT

PROTO_DIR = ROOT / "protos"
V1 = PROTO_DIR / "forgerpc" / "v1"


def test_generated_code_is_fresh(tmp_path):
    subprocess.run([sys.executable, str(PROTO_DIR / "generate.py"), "--out", str(tmp_path)], check=True)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh, "generator produced nothing"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, PROTO_DIR / p, shallow=False)]
    assert not stale, f"regenerate with `make protos` and commit: {stale}"
    committed = sorted(p.relative_to(PROTO_DIR) for p in V1.glob("*_pb2*.py*"))
    assert committed == [p for p in fresh], "generated files without a .proto (or missing ones)"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[descriptor_pb2.FileDescriptorProto]:
    """Descriptors with comments (source info), straight from protoc."""
    from grpc_tools import protoc
    import grpc_tools

    out = tmp_path_factory.mktemp("desc") / "set.pb"
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in V1.glob("*.proto"))
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    assert protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{well_known}", "--include_source_info",
                        f"--descriptor_set_out={out}", *protos]) == 0
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return [f for f in fds.file if f.name.startswith("forgerpc/")]


def _comments(f: descriptor_pb2.FileDescriptorProto) -> dict[tuple, str]:
    return {tuple(loc.path): loc.leading_comments.strip() for loc in f.source_code_info.location}


def test_package_and_one_service_per_file(files):
    assert len(files) == 8
    for f in files:
        assert f.package == "forgerpc.v1", f.name
        assert len(f.service) <= 1, f"{f.name}: one service per file"
        for s in f.service:
            assert s.name.endswith("Service"), s.name
            stem = pathlib.Path(f.name).stem.replace("_", "")
            assert s.name.lower() == stem + "service", f"{f.name} should hold {s.name}"


def test_rpc_request_response_naming(files):
    for f in files:
        for s in f.service:
            for m in s.method:
                assert m.input_type == f".forgerpc.v1.{m.name}Request", f"{s.name}.{m.name} input {m.input_type}"
                assert m.output_type == f".forgerpc.v1.{m.name}Response", f"{s.name}.{m.name} output {m.output_type}"


def test_enum_zero_values_are_unspecified(files):
    import re

    for f in files:
        for e in f.enum_type:
            prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", e.name).upper()
            assert e.value[0].number == 0 and e.value[0].name == f"{prefix}_UNSPECIFIED", e.name
            for v in e.value:
                assert v.name.startswith(prefix + "_"), f"{e.name}.{v.name} lacks prefix {prefix}_"


def test_every_message_field_service_and_rpc_has_a_comment(files):
    # Paths in SourceCodeInfo: 4 = message_type, 2 = field, 5 = enum_type, 2 = value, 6 = service, 2 = method.
    missing = []
    for f in files:
        c = _comments(f)
        for i, msg in enumerate(f.message_type):
            if not c.get((4, i)):
                missing.append(f"{f.name}: message {msg.name}")
            for j, field in enumerate(msg.field):
                if not c.get((4, i, 2, j)):
                    missing.append(f"{f.name}: field {msg.name}.{field.name}")
        for i, enum in enumerate(f.enum_type):
            if not c.get((5, i)):
                missing.append(f"{f.name}: enum {enum.name}")
            for j, value in enumerate(enum.value):
                if not c.get((5, i, 2, j)):
                    missing.append(f"{f.name}: enum value {value.name}")
        for i, service in enumerate(f.service):
            if not c.get((6, i)):
                missing.append(f"{f.name}: service {service.name}")
            for j, method in enumerate(service.method):
                if not c.get((6, i, 2, j)):
                    missing.append(f"{f.name}: rpc {service.name}.{method.name}")
    assert not missing, "add a comment above: " + ", ".join(missing)


def test_repeated_fields_have_plural_names(files):
    singular = []
    for f in files:
        for msg in f.message_type:
            for field in msg.field:
                if field.label == field.LABEL_REPEATED and not field.type_name.endswith("Entry"):
                    if not (field.name.endswith("s") or field.name in ("stop", "data", "shape")):
                        singular.append(f"{msg.name}.{field.name}")
    assert not singular, singular
