"""The package's structure: no import circle among modules, no branch on the model's kind outside
the registry and the model files, and the library never imports the training program or the
converter."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Checkout folder -> installed package (pyproject.toml maps train/ and convert/ under melt_jax).
PACKAGES = {"melt_jax": "melt_jax", "train": "melt_jax.train", "convert": "melt_jax.convert"}
# The files that may ask which kind of model they hold: the models, their configs and tables.
MODEL_FILES = {
    "melt_jax.model.registry",
    "melt_jax.model.config",
    "melt_jax.model.ouro",
    "melt_jax.model.melt",
    "melt_jax.model.ouro_to_melt",
    "melt_jax.model.param_table",
}
MODEL_CLASSES = {"OuroModel", "MeltModel", "OuroConfig", "MeltConfig"}


def _modules() -> dict[str, ast.Module]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            modules[name] = ast.parse(path.read_text(), str(path))
    return modules


MODULES = _modules()
# Modules that are a package's __init__.py: a relative import there starts from the package itself.
PACKAGE_INITS = {
    ".".join((package, *path.relative_to(ROOT / folder).parent.parts))
    for folder, package in PACKAGES.items()
    for path in (ROOT / folder).rglob("__init__.py")
}


def _imports(name: str, tree: ast.Module) -> set[str]:
    """The project modules `name` imports anywhere in its file (function-level imports included)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .mapping import ...
                levels_up = node.level - 1 if name in PACKAGE_INITS else node.level
                base = name.rsplit(".", levels_up)[0] if levels_up else name
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            # `from package import module` imports that module; `from module import name`, the module.
            submodules = [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in MODULES]
            targets = submodules or [module]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


def test_no_import_circle():
    graph = {name: _imports(name, tree) for name, tree in MODULES.items()}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                circle = path[path.index(dep) :] + [dep]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert graph["melt_jax.data.pipeline"] and graph["melt_jax.data.synthetic"]  # the walk sees real edges


def test_the_library_does_not_import_training_or_conversion():
    for name, tree in MODULES.items():
        if name.startswith(("melt_jax.train", "melt_jax.convert")):
            continue
        bad = sorted(d for d in _imports(name, tree) if d.startswith(("melt_jax.train", "melt_jax.convert")))
        assert not bad, f"{name} imports {bad}"


def _kind_branches(tree: ast.Module) -> list[int]:
    """Lines that test a model's kind: isinstance against a model or config class, or a comparison
    involving `.model_type`."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
            classes = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            if any(getattr(c, "id", None) in MODEL_CLASSES for c in classes):
                lines.append(node.lineno)
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(isinstance(o, ast.Attribute) and o.attr == "model_type" for o in operands):
                lines.append(node.lineno)
    return lines


def test_no_branch_on_the_model_kind_outside_the_model_files():
    found = {
        name: lines for name, tree in MODULES.items() if name not in MODEL_FILES and (lines := _kind_branches(tree))
    }
    assert found == {}, found
    # The check must be able to fail: a branch written into a module is found.
    assert _kind_branches(ast.parse("if config.model_type == 'melt':\n    pass\n")) == [1]
    assert _kind_branches(ast.parse("isinstance(model, (OuroModel, MeltModel))")) == [1]


def test_the_references_stay_independent_of_the_library():
    """melt_jax.testing's checkpoints and PyTorch references import nothing of the library (an error
    there cannot hide in them), and the library never imports them."""
    for name, tree in MODULES.items():
        deps = _imports(name, tree)
        if name.startswith("melt_jax.testing"):
            assert all(d.startswith("melt_jax.testing") for d in deps), f"{name} imports {sorted(deps)}"
        else:
            assert not any(d.startswith("melt_jax.testing") for d in deps), f"{name} imports {sorted(deps)}"
    assert _imports("melt_jax.testing.torch_melt", MODULES["melt_jax.testing.torch_melt"])  # real edges seen


# A library module longer than this holds more than one job: split it (ruff's C901 bounds functions).
MAX_MODULE_LINES = 500


def _long_modules(sources: dict[str, str]) -> dict[str, int]:
    return {name: n for name, text in sources.items() if (n := len(text.splitlines())) > MAX_MODULE_LINES}


def test_no_library_module_over_the_size_bound():
    sources = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            sources[f"{package}:{path.relative_to(ROOT / folder)}"] = path.read_text()
    assert _long_modules(sources) == {}
    assert _long_modules({"long.py": "x = 1\n" * (MAX_MODULE_LINES + 1)}) == {"long.py": MAX_MODULE_LINES + 1}


def _exported(package: str) -> set[str]:
    """The names in `package`'s __all__, read from its __init__.py."""
    for node in MODULES[package].body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return {element.value for element in node.value.elts}
    return set()


PUBLIC_PACKAGES = ("melt_jax.model", "melt_jax.model.attention", "melt_jax.inference", "melt_jax.data")


def _private_reach(tree: ast.Module) -> list[str]:
    """`from <package>.<module> import name` of names the package exports itself."""
    exported = {package: _exported(package) for package in PUBLIC_PACKAGES}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            package = node.module.rsplit(".", 1)[0]
            found += [f"{node.module}.{a.name}" for a in node.names if a.name in exported.get(package, ())]
    return found


def test_tests_and_benchmarks_import_the_public_names():
    assert all(_exported(package) for package in PUBLIC_PACKAGES)
    found = {}
    for folder in ("tests", "benchmarks"):
        for path in sorted((ROOT / folder).glob("*.py")):
            if reached := _private_reach(ast.parse(path.read_text())):
                found[f"{folder}/{path.name}"] = reached
    assert found == {}, found
    assert _private_reach(ast.parse("from melt_jax.model.ouro import OuroModel")) == ["melt_jax.model.ouro.OuroModel"]
