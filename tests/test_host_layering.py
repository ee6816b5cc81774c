"""Layering: kohya_patch -> immiscible_host -> immiscible; adapters never import each other."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ADAPTERS = ("kohya_patch", "comfy_nodes")


def imported_roots(package: str) -> dict[str, set[str]]:
    """Top-level modules each file of ``package`` imports (absolute imports only)."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        roots = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                roots |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
        out[str(path.relative_to(REPO))] = roots
    return out


def test_immiscible_host_imports_no_adapter_and_no_host_program():
    for path, roots in imported_roots("immiscible_host").items():
        bad = roots & {*ADAPTERS, "library", "comfy", "musubi_tuner", "accelerate"}
        assert not bad, f"{path} imports {bad}"


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_adapters_never_import_each_other(adapter):
    others = set(ADAPTERS) - {adapter}
    for path, roots in imported_roots(adapter).items():
        assert not roots & others, f"{path} imports {roots & others}"


def test_core_imports_neither_host_layer_nor_adapters():
    for path, roots in imported_roots("immiscible").items():
        assert not roots & {"immiscible_host", *ADAPTERS}, path


def test_kohya_patch_has_no_second_table_of_points():
    """The patch points are listed once, in kohya_patch/points.py."""
    for path in (REPO / "kohya_patch").glob("*.py"):
        if path.name == "points.py":
            continue
        text = path.read_text(encoding="utf-8")
        for needle in ("get_noisy_model_input_and_timesteps\"", "\"library.", "library/train_util.py\","):
            assert needle not in text, f"{path.name} names a patch point ({needle})"
