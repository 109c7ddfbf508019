"""Imports flow one way (docs/architecture.md). Parses every module; fails on an upward import."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_vrft"

# everything below the composition layer
LIBRARY = {"config", "ops", "rl", "rewards", "eval", "data", "distributed", "models", "rollout", "storage"}
# package -> megatron_vrft subpackages it may import (itself always allowed)
ALLOWED_INTERNAL = {
    "storage": set(),
    "config": set(),
    "ops": set(),
    "rl": {"ops"},
    "rewards": {"ops"},
    "eval": {"ops", "rewards", "storage"},
    "data": {"ops", "rewards", "storage"},
    "distributed": set(),
    "models": {"ops", "distributed", "storage"},
    "rollout": {"ops", "rewards", "data", "models", "distributed", "storage"},
    # the one module that builds components from config sections (builders.py): above rollout,
    # below the trainer; only the trainer and the command-line front import it
    "builders": LIBRARY,
    "trainer": LIBRARY | {"builders"},
    "cli": LIBRARY | {"builders", "trainer"},  # the command-line front of the tools (cli.py): on top
}
# third-party roots a package must not import (the pure-math layers stay free of model stacks)
FORBIDDEN_EXTERNAL = {
    "storage": {"torch", "numpy", "megatron", "transformers", "triton"},
    "config": {"torch", "megatron", "transformers", "triton"},
    "ops": {"megatron", "transformers"},
    "rl": {"megatron", "transformers", "triton", "PIL", "datasets"},
    "rewards": {"megatron", "transformers", "triton", "PIL", "datasets"},
    "eval": {"megatron", "transformers", "triton"},
    "data": {"megatron"},
}


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # relative import: resolve against the module's package
                base = path.relative_to(PACKAGE.parent).with_suffix("").parts[: -node.level]
                names.append(".".join(base + ((node.module,) if node.module else ())))
            elif node.module:
                names.append(node.module)
    return names


def test_every_package_is_covered_by_the_rules():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(ALLOWED_INTERNAL), f"add rules for {packages - set(ALLOWED_INTERNAL)}"


def layer_files(name: str) -> list[Path]:
    """The files of subpackage ``name``, or the top-level module ``name.py``."""
    if (PACKAGE / f"{name}.py").exists():
        return [PACKAGE / f"{name}.py"]
    root = PACKAGE / name
    return sorted(root.rglob("*.py")) if root.exists() else []


def test_every_top_level_module_is_covered_by_the_rules():
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert modules <= set(ALLOWED_INTERNAL), f"add rules for {modules - set(ALLOWED_INTERNAL)}"


def test_imports_point_downwards():
    violations = []
    for package, allowed in ALLOWED_INTERNAL.items():
        for path in layer_files(package):
            for name in imported_modules(path):
                parts = name.split(".")
                if parts[0] == "megatron_vrft" and len(parts) > 1:
                    target = parts[1]
                    if target != package and target not in allowed:
                        violations.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
                elif parts[0] in FORBIDDEN_EXTERNAL.get(package, set()):
                    violations.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert violations == [], "\n".join(violations)


def test_rule_checker_catches_an_upward_import(tmp_path):
    bad = tmp_path / "megatron_vrft" / "rl" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from megatron_vrft.models import qwen2_vl\nimport transformers\n")
    assert "megatron_vrft.models" in imported_modules(bad)
    assert "transformers" in imported_modules(bad)
