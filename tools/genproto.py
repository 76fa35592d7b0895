"""Regenerate the protobuf/gRPC modules under onecard/v1 from proto/, or check them.

``python tools/genproto.py`` rewrites them; ``--check`` regenerates into a
temporary directory and fails if the committed files differ, so the wire
definition and the code cannot drift apart.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_PACKAGE = Path("onecard") / "v1"


def generate(out_root: Path) -> list[Path]:
    import grpc_tools

    protos = sorted(
        str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / OUT_PACKAGE).glob("*.proto")
    )
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    pkg = out_root / OUT_PACKAGE
    (pkg / "__init__.py").write_text(
        '"""Generated from proto/onecard/v1 by tools/genproto.py."""\n'
    )
    return sorted(p for p in pkg.iterdir() if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args()
    if not args.check:
        files = generate(ROOT)
        print(f"generated {len(files)} files in {OUT_PACKAGE}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed = ROOT / OUT_PACKAGE
        stale = [
            f.name
            for f in fresh
            if not (committed / f.name).exists()
            or not filecmp.cmp(f, committed / f.name, shallow=False)
        ]
        extra = sorted({p.name for p in committed.glob("*.py*")} - {f.name for f in fresh})
    if stale or extra:
        print(f"generated code is stale: {stale + extra}; run: python tools/genproto.py")
        return 1
    print("generated code matches proto/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
