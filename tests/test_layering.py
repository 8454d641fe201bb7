"""The import contract, read from the source: the spine below the stages, the orchestration on top.

- spine (``kdens/`` outside ``kdens/app/``): imports no stage package and nothing of ``kdens.app``;
- stages (``generalist``, ``ensembles``, ``specialists``, ``distill``, ``deploy``): import the spine,
  their own package, and of another stage only the readers of its run folders (``READERS``);
  never ``kdens.app``;
- ``kdens.app``: the pipeline's plan and runner reach stages only through ``kdens.app.stages``;
- no import cycles, counting imports inside functions;
- no package code installs anything (no pip, no ensurepip).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("generalist", "ensembles", "specialists", "distill", "deploy")
PACKAGES = ("kdens", *STAGES)
# Modules a stage may read another stage's run folders through (teachers of every kind are
# distilled, so distill loads ensembles and specialists as teachers).
READERS = {"ensembles.teacher", "ensembles.combine", "specialists.teacher"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """Project modules ``module`` imports anywhere in its source (functions included)."""
    path = MODULES[module]
    pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(pkg[: len(pkg) - node.level + 1]) if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            r = _resolve(t)
            if r and r != module:
                found.add(r)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _floor(module: str) -> str:
    if module.startswith("kdens.app") or module == "kdens.__main__":  # `python -m kdens` is the CLI
        return "app"
    return "spine" if module.split(".")[0] == "kdens" else module.split(".")[0]


def test_the_graph_is_read():
    assert len(MODULES) > 50 and "kdens.app.stages" in MODULES and "kdens.runs" in MODULES
    assert "deploy.stage" in GRAPH["kdens.app.stages"] and "kdens.artifacts" in GRAPH["deploy.stage"]


def test_the_spine_imports_no_stage_and_no_orchestration():
    bad = {m: sorted(w for w in GRAPH[m] if _floor(w) != "spine")
           for m in MODULES if _floor(m) == "spine"}
    assert not {m: w for m, w in bad.items() if w}


def test_stages_import_the_spine_their_own_package_and_readers_only():
    bad = {}
    for m in MODULES:
        floor = _floor(m)
        if floor in ("spine", "app"):
            continue
        wrong = sorted(w for w in GRAPH[m]
                       if _floor(w) == "app" or (_floor(w) not in ("spine", floor) and w not in READERS))
        if wrong:
            bad[m] = wrong
    assert not bad


def test_plan_and_pipeline_reach_stages_only_through_the_table():
    for m in ("kdens.app.plan", "kdens.app.pipeline"):
        assert not [w for w in GRAPH[m] if _floor(w) in STAGES], m


def test_no_import_cycles():
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles


def test_no_package_code_installs_anything():
    offenders = []
    for m, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in ("pip", "ensurepip"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pip", "ensurepip") for n in names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders


def test_one_table_of_stage_kinds():
    from kdens.app.cli import cli
    from kdens.app.stages import STAGES as TABLE

    commands = {k.command.name for k in TABLE.values() if k.command is not None}
    assert commands == {"train-generalist", "train-ensemble", "train-specialists", "distill", "deploy", "bench"}
    assert commands <= set(cli.commands)
    for kind in TABLE.values():
        assert kind.run is None or kind.config is not None, kind.kind
    assert {"generalist", "baseline", "ensemble", "specialists", "student", "deploy", "bench"} <= set(TABLE)
