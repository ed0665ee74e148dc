"""Regenerate the Python protobuf / gRPC modules of protos/ into server/rpc/gen/ (run after editing a .proto)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
DEFAULT_OUT = ROOT / "server" / "rpc" / "gen"
#: Python package the output directory is importable as; protoc writes imports relative to PROTO_ROOT
#: (``from qlora_server.v1 import ...``), which are rewritten to be absolute under this package.
PACKAGE = "server.rpc.gen"

_INIT_DOCS = {
    Path("__init__.py"): "Generated protobuf / gRPC modules (do not edit; regenerate with scripts/gen_protos.py).",
    Path("qlora_server/__init__.py"): "Generated code of the qlora_server proto package (do not edit).",
    Path("qlora_server/v1/__init__.py"): "Generated code of qlora_server.v1 (do not edit; see protos/).",
}


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every ``.proto`` under ``proto_root``, relative to it, sorted."""
    return sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))


def generate(out_dir: Path = DEFAULT_OUT, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run ``python -m grpc_tools.protoc`` on every proto into ``out_dir`` (``*_pb2.py``, ``*_pb2.pyi``,
    ``*_pb2_grpc.py``), rewrite imports of sibling generated modules to absolute ``server.rpc.gen.`` ones and
    write the packages' ``__init__.py`` files.

    Returns the files written, relative to ``out_dir``. Raises ``subprocess.CalledProcessError`` when protoc
    fails (its message is on stderr).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = proto_files(proto_root)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_root}", f"--python_out={out_dir}",
         f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *map(str, protos)],
        check=True, cwd=proto_root,
    )
    top_packages = sorted({p.parts[0] for p in protos})
    import_re = re.compile(rf"^(from|import) ({'|'.join(map(re.escape, top_packages))})([. ])", re.MULTILINE)
    written: list[Path] = []
    for path in sorted(out_dir.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi") or path.name == "__init__.py":
            continue
        text = path.read_text()
        fixed = import_re.sub(rf"\1 {PACKAGE}.\2\3", text)
        if fixed != text:
            path.write_text(fixed)
        written.append(path.relative_to(out_dir))
    for rel, doc in _INIT_DOCS.items():
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / rel).write_text(f'"""{doc}"""\n')
        written.append(rel)
    return sorted(written)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python scripts/gen_protos.py [--out DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: server/rpc/gen)")
    args = parser.parse_args(argv)
    for rel in generate(args.out):
        print(args.out / rel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
