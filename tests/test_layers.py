"""DESIGN.md's layers: each package of fastpt imports only its own layer and those below it,
imports inside functions included (a late import that goes up a layer is still a dependency
on it). Read from the installed package's sources, without importing them."""

from __future__ import annotations

import ast
from pathlib import Path

import fastpt

# DESIGN.md's layers, top first. Beside them: commands, demo and benchmarks are what the cli
# runs; patch (fastpt's kernels inside transformers models) sits with the adaptation layer.
LAYERS = [
    {"__main__", "cli", "commands", "demo", "benchmarks"},
    {"train"},
    {"pretrain"},
    {"finetune", "icl", "patch"},
    {"models"},
    {"nn"},
    {"ops"},
]
# Side layers: mdp builds on the value-iteration op alone, and only the cli layer uses it; data
# (tokenizers, datasets, collators) builds on nothing of fastpt's, and any layer may use it.
MDP_ALLOWED = {"ops"}
# Utilities every layer may import; "fastpt" is the package root, read for __version__.
BASE = {"fastpt", "_C", "_atomic", "_checks", "_loader", "_memory", "alloc"}

ROOT = Path(fastpt.__file__).parent


def _package(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "fastpt":
        return None
    return parts[1] if len(parts) > 1 else "fastpt"


def _allowed(package: str) -> set[str]:
    if package == "mdp":
        return BASE | MDP_ALLOWED | {"mdp"}
    if package == "data":
        return BASE | {"data"}
    level = next(i for i, layer in enumerate(LAYERS) if package in layer)
    below = set().union(*LAYERS[level:])
    return BASE | below | {"data"} | ({"mdp"} if level == 0 else set())


def _imports(text: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, imported module) of every import in ``text``, the source of ``module``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                keep = len(module.split(".")) - node.level + is_package
                base = ".".join(module.split(".")[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module
            found.append((node.lineno, base))
    return found


def _file_imports(path: Path) -> list[tuple[int, str]]:
    module = ".".join(("fastpt",) + path.relative_to(ROOT).with_suffix("").parts)
    return _imports(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")


def test_every_package_has_a_layer():
    packages = {p.name if p.is_dir() else p.stem for p in ROOT.iterdir()
                if (p.is_dir() and (p / "__init__.py").is_file()) or (p.suffix == ".py" and p.stem != "__init__")}
    known = set().union(*LAYERS) | BASE | {"mdp", "data"}
    assert packages - known == set(), "add the new package to a layer in tests/test_layers.py"


def test_no_package_imports_a_layer_above_it():
    files = [p for p in ROOT.rglob("*.py") if p != ROOT / "__init__.py"]  # the root re-exports
    assert len(files) > 100  # the installed sources were found
    wrong = []
    for path in files:
        package = path.relative_to(ROOT).parts[0].removesuffix(".py")
        if package in BASE:
            continue
        allowed = _allowed(package)
        for line, imported in _file_imports(path):
            target = _package(imported)
            if target is not None and target not in allowed:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({package}) imports {imported}")
    assert wrong == [], "\n".join(wrong)


def test_the_check_sees_late_imports():
    """The check must catch what it is for: imports inside a function, relative ones too."""
    text = "def f():\n    from fastpt.finetune.lora import LoraLayer\n    from ..train import Trainer\n"
    found = {_package(m) for _, m in _imports(text, "fastpt.nn.probe", False)}
    assert found == {"finetune", "train"} and not found & _allowed("nn")
