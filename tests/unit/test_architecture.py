"""The dependency direction of the package's layers, checked on the source (no imports executed).

config <- kernels <- parallel <- models <- data, train <- cli, launch; integrations import the rest, never the reverse.
Kernels never import torch.distributed, config never imports torch, and optional extras are imported
lazily (inside functions), never at module level.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "distseq"
LAYER = {
    "utils": 0,
    "config": 0,
    "kernels": 1,
    "parallel": 2,
    "models": 3,
    "data": 4,
    "train": 4,
    "plan": 4,
    "testing": 4,
    "cli": 5,
    "launch": 5,
    "__main__": 6,
    "integrations": 6,
}
OPTIONAL = {
    "triton",
    "flash_attn",
    "fla",
    "deepspeed",
    "megatron",
    "nvtx",
    "apex",
    "yaml",
    "matplotlib",
    "tensorboard",
}
MODULES = sorted(p for p in ROOT.rglob("*.py"))


def _package(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    return "__init__" if rel == ("__init__.py",) else rel[0].removesuffix(".py")


def _imports(tree: ast.AST, *, top_level_only: bool) -> list[str]:
    names = []
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _top_level_imports(tree: ast.Module) -> list[str]:
    # Module-level statements, including those under `if` / `try` at module level but not TYPE_CHECKING blocks.
    out = []
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        out += (
            _imports(ast.Module(body=[node], type_ignores=[]), top_level_only=False)
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            else []
        )
    return out


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_layering(path):
    tree = ast.parse(path.read_text())
    package = _package(path)
    everything = _imports(tree, top_level_only=False)
    if package == "__init__":
        return  # the public API re-exports from every layer
    own = LAYER[package]
    for name in everything:
        parts = name.split(".")
        if parts[0] == "distseq" and len(parts) > 1 and parts[1] in LAYER:
            assert LAYER[parts[1]] <= own, f"{package} (layer {own}) must not import {name}"
        if parts[0] == "megatron":  # the plugin, and its CPU shims for tests
            assert package == "integrations" or path.name == "megatron.py" and package == "testing", (
                f"only distseq.integrations.megatron (and distseq/testing/megatron.py) may import megatron ({name})"
            )
    if package == "kernels":
        assert not any(n.startswith("torch.distributed") for n in everything), "kernels are local math only"
    if package == "config":
        assert not any(n.split(".")[0] == "torch" for n in everything), "config must not import torch"
    top_level = _top_level_imports(tree)
    if not _is_backend_module(path):
        lazy = [n for n in top_level if n.split(".")[0] in OPTIONAL]
        assert not lazy, f"optional extras must be imported lazily, found module-level imports {lazy}"
    backends = [n for n in top_level if n.startswith("distseq.") and _is_backend_module(_module_path(n))]
    if package == "integrations":  # an integration's modules import each other: they serve one extra
        backends = [n for n in backends if not n.startswith("distseq.integrations.")]
    assert not backends, f"backend modules must be imported lazily (inside a function), found {backends}"


def _is_backend_module(path: Path) -> bool:
    """Modules that exist to wrap one optional extra (triton_*.py, integrations/): they may import it at the
    top, and nothing else imports them at module level, so `import distseq` never needs the extra."""
    rel = path.relative_to(ROOT).parts if path.is_relative_to(ROOT) else ()
    return bool(rel) and (rel[-1].startswith("triton_") or rel[0] == "integrations")


def _module_path(name: str) -> Path:
    return ROOT.parent.joinpath(*name.split(".")).with_suffix(".py")


def test_every_module_is_checked():
    assert len(MODULES) > 10 and all(_package(p) in LAYER or _package(p) == "__init__" for p in MODULES)


# torch APIs newer than the oldest supported torch (2.11): only distseq/utils/compat.py may name them.
NEWER_THAN_OLDEST_TORCH = ("all_gather_single", "reduce_scatter_single")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_newer_torch_apis_only_through_compat(path):
    if path.relative_to(ROOT).parts == ("utils", "compat.py"):
        return
    used = [name for name in NEWER_THAN_OLDEST_TORCH if name in path.read_text()]
    assert not used, f"{used} are newer than torch 2.11: call them through distseq.utils.compat"
