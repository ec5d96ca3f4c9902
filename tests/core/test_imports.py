"""Every `pkg.sub` attribute access in mmkit works in a fresh interpreter that imported only `pkg`.

`import importlib` followed by `importlib.util.find_spec` works only when something else already imported
`importlib.util`, as an editable install's import finder does; in an installed wheel it raised AttributeError and
broke the whole command line. This finds every such access statically and checks each in a clean subprocess.
"""

import ast
import importlib.util
import subprocess
import sys
import sysconfig
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mmkit"


def _submodule_accesses() -> dict[str, set[str]]:
    """{'importlib.util': {'mmkit/cli/__init__.py:40', ...}} for `a.b` attribute chains on a plainly imported
    module `a` where `a.b` is itself a module that the file never imports by name."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname is None:
                        parts = alias.name.split(".")
                        imported.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            chain, base = [], node
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if not (isinstance(base, ast.Name) and base.id in imported):
                continue
            chain = [base.id] + chain[::-1]
            for i in range(2, len(chain) + 1):
                dotted = ".".join(chain[:i])
                if dotted in imported:
                    continue
                try:
                    is_module = importlib.util.find_spec(dotted) is not None
                except (ImportError, ValueError):
                    is_module = False
                if is_module:
                    found.setdefault(dotted, set()).add(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
                break
    return found


def test_submodules_used_as_attributes_are_imported_by_their_parent():
    accesses = _submodule_accesses()
    assert "importlib.util" in accesses or "torch.nn" in accesses  # the scan sees real code
    by_parent: dict[str, list[str]] = {}
    for dotted in sorted(accesses):
        parent, _, name = dotted.rpartition(".")
        by_parent.setdefault(parent, []).append(name)
    missing = []
    for parent, names in by_parent.items():
        # -I -S: no PYTHONPATH and no .pth files (an editable install's finder imports importlib.util at start-up
        # and would hide the bug); site-packages is put on the path as a plain directory, as in a wheel install.
        # One interpreter per parent, so one package's imports cannot load another's submodules.
        check = (
            "import sys\n"
            f"sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
            f"import {parent}\n"
            f"print(' '.join(n for n in {names!r} if not hasattr({parent}, n)))\n"
        )
        out = subprocess.run([sys.executable, "-I", "-S", "-c", check], capture_output=True, text=True, cwd="/",
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        missing += [f"{parent}.{name}" for name in out.stdout.split()]
    assert not missing, {m: sorted(accesses[m]) for m in missing}
