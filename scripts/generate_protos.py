"""Regenerates the checked-in gRPC stubs under autoloader/v1 from proto/.

    python scripts/generate_protos.py          # rewrite autoloader/v1/*_pb2*.py[i]
    python scripts/generate_protos.py --check  # exit 1 if the checked-in stubs are stale

The proto package (autoloader.v1) equals the import path, so the generated
imports work as they are.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_PACKAGE = Path("autoloader") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_dir: Path) -> list[Path]:
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / OUT_PACKAGE).glob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out=quiet:{out_dir}",
        f"--mypy_grpc_out=quiet:{out_dir}",
        *protos,
    ]
    # protoc finds the mypy plugins on PATH; they live beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_dir / OUT_PACKAGE).iterdir())


def generated_files(directory: Path) -> dict[str, Path]:
    return {p.name: p for p in directory.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if checked-in stubs differ")
    check = parser.parse_args().check
    target = ROOT / OUT_PACKAGE
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = generated_files(Path(tmp) / OUT_PACKAGE)
        current = generated_files(target)
        stale = sorted(
            name
            for name in fresh.keys() | current.keys()
            if name not in fresh or name not in current or not filecmp.cmp(fresh[name], current[name], shallow=False)
        )
        if check:
            if stale:
                print("stale generated stubs (run: python scripts/generate_protos.py):", *stale, sep="\n  ")
                return 1
            print(f"generated stubs are up to date ({len(current)} files)")
            return 0
        for name in current.keys() - fresh.keys():
            current[name].unlink()
        for name, path in fresh.items():
            (target / name).write_bytes(path.read_bytes())
        print(f"wrote {len(fresh)} files to {target.relative_to(ROOT)} ({len(stale)} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
