"""The package's layers follow one step's data flow, and imports only point down the stack: a module
may import from its own layer and the layers listed before it, never from a later one (function-local
imports included; they used to hide such arrows). A new upward arrow fails here, naming the line."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "lit_opd"

# Bottom to top. The foundation, then prompts -> rollout -> teacher -> objective -> (callbacks) ->
# methods (the update), then what puts them together for a user.
LAYERS = (
    "errors", "types", "schedules", "lora", "models", "tiny", "checkpoints",
    "tasks", "rollout", "teachers", "objectives", "callbacks", "methods",
    "export", "run_dirs", "cli", "__main__", "__init__",
)


def layer_of(module: str) -> str:
    """``lit_opd.rollout.engines.vllm`` -> ``rollout``; the package itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def upward_imports(source: str, module: str) -> list[str]:
    """``line: importer -> imported`` for each import in ``source`` (of ``module``) that points up."""
    here = LAYERS.index(layer_of(module))
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            targets = [node.module or ""]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            if target.startswith("lit_opd.") and LAYERS.index(layer_of(target)) > here:
                found.append(f"{node.lineno}: {module} -> {target}")
    return found


def test_every_layer_is_known():
    names = {layer_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert names <= set(LAYERS), sorted(names - set(LAYERS))


def test_no_module_imports_from_a_later_layer():
    found = [f"{p.relative_to(PACKAGE.parent)}:{line}" for p in sorted(PACKAGE.rglob("*.py"))
             for line in upward_imports(p.read_text(), module_name(p))]
    assert not found, "imports that point up the layers:\n" + "\n".join(found)


def test_a_planted_upward_import_is_caught():
    planted = "def f():\n    from lit_opd.methods.base import PolicyModule\n    return PolicyModule\n"
    assert upward_imports(planted, "lit_opd.rollout.datamodule") == [
        "2: lit_opd.rollout.datamodule -> lit_opd.methods.base"]
    assert upward_imports("import lit_opd.errors\n", "lit_opd.rollout.datamodule") == []


def test_every_method_shares_the_one_training_step():
    """A method writes its ``compute_loss``; the step itself (loss, logging) lives in PolicyModule."""
    from lit_opd import MADOPDModule, OmniOPDModule, OPDModule, PolicyModule, SFTModule
    from lit_opd.methods.list_opd import ListOPDModule

    for method in (OPDModule, SFTModule, OmniOPDModule, MADOPDModule, ListOPDModule):
        assert method.training_step is PolicyModule.training_step, method.__name__
        assert method.compute_loss is not PolicyModule.compute_loss, method.__name__
