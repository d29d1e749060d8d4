"""Compile protos/pyacemaker/v1/*.proto into the importable package pyacemaker.v1.

Run by `make protos` (part of `make install`). The output is generated, ignored by git and never edited.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
OUT_PACKAGE = REPO_ROOT / "pyacemaker" / "v1"


def main() -> int:
    sources = sorted(str(p) for p in (PROTO_ROOT / "pyacemaker" / "v1").glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    OUT_PACKAGE.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={REPO_ROOT}",
        f"--pyi_out={REPO_ROOT}",
        f"--grpc_python_out={REPO_ROOT}",
        *sources,
    ]
    rc = protoc.main(args)
    if rc != 0:
        print(f"protoc failed with exit code {rc}", file=sys.stderr)
        return rc
    (OUT_PACKAGE / "__init__.py").write_text('"""Generated from protos/pyacemaker/v1 by protos/build.py."""\n')
    print(f"generated {len(sources)} proto modules into {OUT_PACKAGE.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
