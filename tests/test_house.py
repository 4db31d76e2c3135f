"""The scripts' house: imports go one way along ORDER (no cycle, none hidden in a function), each top-level name
is defined in one script only, and losses.py imports only torch and the standard library."""

import ast
import sys

from conftest import ROOT

# Lowest first: a script may import only the scripts before it.
ORDER = (
    "losses",
    "models",
    "noise",
    "data",
    "runfolder",
    "config",
    "audit",
    "report",
    "hub",
    "eval",
    "train",
    "cluster",
    "sweep",
    "bench",
)
SHARED_NAMES = {"main", "parse_args"}  # each script's own entry point and command line


def scripts() -> dict[str, ast.Module]:
    """Every root script by module name, parsed."""
    return {p.stem: ast.parse(p.read_text()) for p in sorted(ROOT.glob("*.py"))}


def imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """(module, at top level) for every import statement, also those inside functions."""
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name.split(".")[0], id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], id(node) in top))
    return found


def test_every_script_has_a_place_in_the_order():
    assert set(scripts()) <= set(ORDER), set(scripts()) - set(ORDER)


def test_imports_go_one_way_and_none_hides_in_a_function():
    trees = scripts()
    for name, tree in trees.items():
        for module, at_top in imports(tree):
            if module in trees and module != name:
                assert at_top, f"{name}.py imports {module} inside a function"
                assert ORDER.index(module) < ORDER.index(name), f"{name}.py imports {module}, which comes after it"


def test_losses_imports_only_torch_and_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"torch", "__future__"}
    assert {m for m, _ in imports(scripts()["losses"])} <= allowed


def test_each_top_level_name_is_defined_in_one_script():
    owners: dict[str, list[str]] = {}
    for name, tree in scripts().items():
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined = [node.name]
            elif isinstance(node, ast.Assign):
                defined = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                defined = [node.target.id]
            else:
                continue
            for d in defined:
                owners.setdefault(d, []).append(name)
    twice = {d: where for d, where in owners.items() if len(where) > 1 and d not in SHARED_NAMES}
    assert not twice, twice
