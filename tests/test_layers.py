"""The layering, checked on the source: imports point one way and no module imports itself
back through others.

    engine      worker/ (scoring math, pruning, backends, the round step, messages, errors):
                no SQL, no Celery, no DIFFLABEL_* environment reads
    store       orchestrator/ settings, schema, db, jobs, lifecycle, sources, s3, results:
                imports the engine's types and errors only
    executors   worker/ broker, round, driver, embedded, celery_app, repair, heartbeat, backoff, memory,
                metrics, events
    cli         orchestrator/ group, cli, job_commands, local_commands, report

Every import counts, the ones inside functions too (they are deferred for start-up time,
not to hide a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("worker", "orchestrator", "migrations")

EXECUTORS = {"worker.broker", "worker.round", "worker.driver", "worker.embedded", "worker.celery_app", "worker.repair",
             "worker.heartbeat", "worker.backoff", "worker.memory", "worker.metrics", "worker.events"}
CLI = {"orchestrator.group", "orchestrator.cli", "orchestrator.job_commands", "orchestrator.local_commands",
       "orchestrator.report", "orchestrator.serve_commands", "orchestrator.review_commands"}
LAYERS = {"engine": 0, "store": 1, "executors": 2, "cli": 3}


def layer(module: str) -> str:
    if module in EXECUTORS:
        return "executors"
    if module in CLI:
        return "cli"
    if module.startswith("worker"):
        return "engine"
    return "store"  # orchestrator's data modules and migrations


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (REPO / pkg).rglob("*.py"):
            parts = list(p.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """Project modules that ``path`` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n not in PACKAGES:
                found.add(n)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def test_imports_point_down_the_layers():
    wrong = [f"{m} ({layer(m)}) imports {d} ({layer(d)})"
             for m, deps in graph().items() for d in deps
             if LAYERS[layer(d)] > LAYERS[layer(m)]]
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    g = graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_engine_reads_no_settings_and_touches_no_services():
    bad = []
    for m, p in modules().items():
        if layer(m) != "engine":
            continue
        text = p.read_text()
        for needle in ("os.environ", "getenv", "sqlalchemy", "celery", "import redis", "boto3"):
            if needle in text:
                bad.append(f"{m}: {needle}")
    assert not bad, bad


def test_one_module_writes_item_and_job_state():
    """Only orchestrator.lifecycle assigns an item's status, token or lease, or a job's status."""
    writers = set()
    for m, p in modules().items():
        for node in ast.walk(ast.parse(p.read_text())):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for t in targets:
                for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if isinstance(el, ast.Attribute) and el.attr in ("status", "token", "lease_owner",
                                                                     "lease_expires_at", "attempts") \
                            and ast.unparse(el.value) in ("item", "it", "job", "j"):
                        writers.add(m)
            if isinstance(node, ast.keyword) and node.arg in ("status", "token", "lease_owner") and m != "migrations":
                if isinstance(node.value, ast.Attribute) and "Status" in ast.unparse(node.value):
                    writers.add(m)
    # jobs.py creates rows (a new job, its items); every later change is lifecycle's.
    assert writers <= {"orchestrator.lifecycle", "orchestrator.jobs"}, writers
