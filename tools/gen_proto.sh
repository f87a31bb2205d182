#!/usr/bin/env bash
# Regenerate proto/caffe_pb2.py from proto/caffe.proto.
#
# The generator is pinned (grpcio-tools 1.75.1 bundles protoc 31.1, i.e.
# Python gencode 6.31.1) so the output, and thus the minimum protobuf runtime
# it needs (protobuf>=6.31.1), does not depend on whatever is installed.
# It is installed into a private virtualenv, leaving the project env alone.
# Override with PROTOC_PYTHON=/path/to/python (must have grpc_tools).
set -euo pipefail

GRPCIO_TOOLS_VERSION="1.75.1"
EXPECTED_PROTOC="libprotoc 31.1"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

if [[ -n "${PROTOC_PYTHON:-}" ]]; then
  py="$PROTOC_PYTHON"
else
  venv="${GEN_PROTO_VENV:-${TMPDIR:-/tmp}/automtl-gen-proto-venv}"
  if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
  fi
  py="$venv/bin/python"
  if ! "$py" -c "import grpc_tools" 2>/dev/null ||
     [[ "$("$py" -m grpc_tools.protoc --version)" != "$EXPECTED_PROTOC" ]]; then
    "$py" -m pip install --quiet "grpcio-tools==${GRPCIO_TOOLS_VERSION}"
  fi
fi

version="$("$py" -m grpc_tools.protoc --version)"
if [[ "$version" != "$EXPECTED_PROTOC" ]]; then
  echo "warning: generator is '$version', expected '$EXPECTED_PROTOC';" \
       "the runtime requirement in proto/README.md may change" >&2
fi

# -I proto makes the module name plain `caffe_pb2` with no package-path
# imports, so it works when installed as automtl_compiler.proto.caffe_pb2.
"$py" -m grpc_tools.protoc -I proto --python_out=proto proto/caffe.proto
echo "generated proto/caffe_pb2.py with $version"
