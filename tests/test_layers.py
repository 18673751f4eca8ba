"""Imports point one way: errors <- types <- config/drawing <- io/models <- data <- stages <- pairs <- loop <- cli."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "anisora_ray"

LAYERS = {
    "errors": 0,
    "types": 1,
    "config": 2, "drawing": 2,
    "io": 3, "models": 3, "runtime": 3, "tracking": 3,
    "data": 4, "weights": 4, "storage_check": 4,
    "generation": 5, "reward": 5, "gapo": 5,
    "pairs": 6, "eval": 6,
    "loop": 7,
    "cli": 8, "cli_eval": 8, "cli_tools": 8,
}
RAY_FREE = {"types", "config", "errors", "io", "models", "data", "drawing"}


def unit_of(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0] if rel.parts[0] != "__init__" else "__init__"


def imports_of(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_every_unit_has_a_layer():
    units = {unit_of(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert units <= set(LAYERS), f"give these a layer in tests/test_layers.py: {sorted(units - set(LAYERS))}"


def test_imports_point_down_only():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        unit = unit_of(path)
        if unit == "__init__":
            continue
        for name in imports_of(path):
            parts = name.split(".")
            if parts[0] != "anisora_ray" or len(parts) < 2:
                continue
            target = parts[1]
            if target != unit and LAYERS.get(target, -1) >= LAYERS[unit]:
                bad.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_lower_layers_do_not_import_ray():
    bad = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if unit_of(p) in RAY_FREE and any(n == "ray" or n.startswith("ray.") for n in imports_of(p))
    ]
    assert not bad, f"pure modules that import ray: {bad}"


def test_modules_stay_small():
    big = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not big, f"split these modules (over 400 lines): {big}"
