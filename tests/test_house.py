"""The package's shape (issue 21): no module imports another's private names, and no import cycle among the modules'
top-level imports (an import inside a function, made when it runs, may close a loop)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "amanlib"


def _modules() -> dict[str, Path]:
    """amanlib's module names -> their files (a package by its own name)."""
    return {".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path, top_only: bool) -> list[tuple[str, str]]:
    """(amanlib module, name taken from it) of every `from ... import` of a module, relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    found = []
    for node in tree.body if top_only else ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            parts = package.split(".")
            module = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        if module.split(".")[0] == "amanlib":
            found += [(module, alias.name) for alias in node.names]
    return found


def test_no_module_imports_another_modules_private_names():
    private = [(name, f"{module}.{imported}") for name, path in _modules().items()
               for module, imported in _imports(name, path, top_only=False)
               if imported.startswith("_") and not imported.startswith("__")]
    assert not private, f"private names imported across modules: {private}"


def test_no_import_cycle_at_module_level():
    modules = _modules()
    graph = {name: {f"{m}.{n}" if f"{m}.{n}" in modules else m for m, n in _imports(name, path, top_only=True)}
             & set(modules) - {name} for name, path in modules.items()}

    def cycle_from(start):
        stack, seen = [[start]], set()
        while stack:
            trail = stack.pop()
            for dep in graph[trail[-1]]:
                if dep == start:
                    return trail + [dep]
                if dep not in seen:
                    seen.add(dep)
                    stack.append(trail + [dep])
        return None

    cycles = [c for c in map(cycle_from, modules) if c]
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_only_notebook_04_writes_metrics_json():
    """Each notebook writes only its own outputs: metrics.json is notebook 04's (record_training); 05 reads it."""
    import json
    writers = ("record_training", "update_metrics", "save_json")
    for path in sorted((ROOT.parent / "notebooks").glob("*.ipynb")):
        code = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
        called = [w for w in writers if w + "(" in code]
        assert called == (["record_training"] if path.name.startswith("04") else []), f"{path.name} calls {called}"


def test_the_runners_take_keywords_after_features_and_index():
    """run_loso, run_sweep, run_ablations and run_oracle take (features, index, *, ...), build_feature_cache
    (index, *, ...): the same settings by the same names, never by position."""
    import inspect

    from amanlib.features import build_feature_cache
    from amanlib.sweep import run_ablations, run_oracle, run_sweep
    from amanlib.train import run_loso
    for fn, leading in ((run_loso, 2), (run_sweep, 2), (run_ablations, 2), (run_oracle, 2), (build_feature_cache, 1)):
        kinds = [p.kind for p in inspect.signature(fn).parameters.values()]
        assert kinds[:leading] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * leading, fn.__name__
        assert set(kinds[leading:]) == {inspect.Parameter.KEYWORD_ONLY}, fn.__name__
