"""The package's layers (docs/design.md, "Layers"): every import of a fusedreg module points
down or sideways, never up, and the registry imports no other fusedreg module.

Read from the source with ``ast`` (module-level and function-level imports alike), so a
lazy import inside a function cannot hide an upward arrow."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "fusedreg"

# rank of each layer: a module may import modules of its own rank or lower
LAYERS = {
    "tools": 4,      # fusedreg.bench: the benchmark command
    "user API": 3,   # functional, nn, autograd, optim, patching, compiling, the package
    "ops": 2,        # registered custom ops and the autograd Functions over them
    "kernels": 1,    # reference and Triton implementations
    "shared": 0,     # the registry and the small helpers every layer uses
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts == ["fusedreg"]:
        return "user API"
    top = parts[1]
    if top == "bench":
        return "tools"
    if top in ("functional", "nn", "autograd", "optim", "patching", "compiling"):
        return "user API"
    if top == "ops":
        return "ops"
    if top in ("reference", "triton"):
        return "kernels"
    if top in ("backends", "_checks", "_dtypes", "_seed", "_activations", "_C"):
        return "shared"
    raise AssertionError(f"{module} belongs to no layer: add it to tests/test_layers.py")


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def imported(module: str, path: pathlib.Path):
    """The fusedreg modules that ``module`` imports (absolute names)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # "from . import x" imports the submodule x; "from .m import f" imports m
            names = [f"{prefix}.{a.name}" if _is_module(f"{prefix}.{a.name}") else prefix
                     for a in node.names]
        else:
            continue
        for name in names:
            if name == "fusedreg" or name.startswith("fusedreg."):
                yield name


def _is_module(name: str) -> bool:
    rel = pathlib.Path(*name.split(".")[1:]) if "." in name else pathlib.Path()
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


ALL = list(modules())


def test_every_module_has_a_layer():
    assert len(ALL) > 20
    for module, _ in ALL:
        layer_of(module)


@pytest.mark.parametrize("module,path", ALL, ids=[m for m, _ in ALL])
def test_imports_point_down(module, path):
    own = LAYERS[layer_of(module)]
    for target in imported(module, path):
        if target == "fusedreg._C":
            continue
        assert LAYERS[layer_of(target)] <= own, (
            f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)}), a layer above it")


def test_the_registry_imports_no_other_fusedreg_module():
    path = ROOT / "backends.py"
    assert [t for t in imported("fusedreg.backends", path) if t != "fusedreg._C"] == []


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule can fail: a kernel module that imports the functional API is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from ..functional import dropout\n")
    targets = list(imported("fusedreg.reference.bad", bad))
    assert targets == ["fusedreg.functional"]
    assert LAYERS[layer_of(targets[0])] > LAYERS[layer_of("fusedreg.reference.bad")]
