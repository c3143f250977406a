"""The longest functions and modules of pipeline/ at a git revision (or the working tree), in lines.

    .venv/bin/python benchmarks/code_size.py                # working tree
    .venv/bin/python benchmarks/code_size.py 82322c7        # a commit
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sources(rev: str | None) -> dict[str, str]:
    if rev is None:
        return {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "pipeline").rglob("*.py"))}
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", rev, "pipeline/"],
                           capture_output=True, text=True, check=True).stdout.split()
    return {n: subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{n}"], capture_output=True, text=True,
                              check=True).stdout for n in names if n.endswith(".py")}


def main(rev: str | None = None, top: int = 8) -> None:
    funcs, mods = [], []
    for name, text in sources(rev).items():
        mods.append((len(text.splitlines()), name))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((node.end_lineno - node.lineno + 1, f"{name}:{node.name}"))
    print(f"# {rev or 'working tree'}")
    print("longest functions: " + ", ".join(f"{n} {k}" for k, n in sorted(funcs, reverse=True)[:top]))
    print("longest modules:   " + ", ".join(f"{n} {k}" for k, n in sorted(mods, reverse=True)[:top]))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
