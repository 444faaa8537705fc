"""The fence around Prefect's private API (``ops/prefect_private.py``), checked without a server.

Fails when a private ``BaseWorker`` member the in-process worker relies on disappears or changes
its signature in the installed Prefect, when Prefect stops calling the hook the worker overrides,
when any module outside the fence reaches a private member, or when the Prefect pin drifts from the
tested version. The fallback (a stock process worker serving a silo pool for a round) runs in
``tests/integration/test_stack.py``.
"""

from __future__ import annotations

import ast
import inspect
import re
import tomllib
from pathlib import Path

import prefect
from packaging.specifiers import SpecifierSet
from prefect._internal.observers import FlowRunCancellingObserver
from prefect.workers.base import BaseWorker
from prefect.workers.process import ProcessWorker

from ops.prefect_private import OBSERVER_MEMBERS, PRIVATE_MEMBERS, FencedWorker
from ops.worker import InProcessWorker

ROOT = Path(__file__).resolve().parents[2]
FENCE = ROOT / "ops" / "prefect_private.py"
# The members FencedWorker awaits (a coroutine function turned plain would hand it an unawaited value).
AWAITED = {"_submit_run", "_propose_pending_state", "_propose_crashed_state", "_submit_scheduled_flow_runs"}


def test_recorded_signatures_match_the_installed_prefect() -> None:
    changed = []
    for name, recorded in PRIVATE_MEMBERS.items():
        if recorded is None:
            continue
        member = getattr(BaseWorker, name, None)
        if member is None:
            changed.append(f"BaseWorker.{name}: gone")
            continue
        now = str(inspect.signature(member))
        if now != recorded:
            changed.append(f"BaseWorker.{name}: recorded {recorded}, installed {now}")
        if (name in AWAITED) != inspect.iscoroutinefunction(member):
            changed.append(
                f"BaseWorker.{name}: coroutine function is now {inspect.iscoroutinefunction(member)}"
            )
    for name, recorded in OBSERVER_MEMBERS.items():
        member = getattr(FlowRunCancellingObserver, name, None)
        now = str(inspect.signature(member)) if member is not None else "gone"
        if now != recorded:
            changed.append(f"FlowRunCancellingObserver.{name}: recorded {recorded}, installed {now}")
    assert not changed, (
        f"Prefect {prefect.__version__} changed private members ops/prefect_private.py uses "
        "(read the new code, adapt the fence, then record the signatures; meanwhile serve the pools "
        "with the stock process worker):\n" + "\n".join(changed)
    )


def test_attributes_the_fence_reads_are_set_by_the_worker() -> None:
    worker = InProcessWorker(work_pool_name="fence-probe")
    attributes = [n for n, sig in PRIVATE_MEMBERS.items() if sig is None]
    missing = [n for n in attributes if not hasattr(worker, n)]
    assert not missing, f"BaseWorker.__init__ no longer sets {missing}"
    assert worker._submitting_flow_run_ids == set() and worker._work_queues == set()
    assert worker._has_successfully_synced is False and worker._work_pool is None
    # Before start(): the fence's public names answer "not synced" and "all queues".
    assert worker.synced_pool() is None and worker.queue_names() == set()


def test_prefect_still_calls_the_overridden_hook_and_creates_the_task_group() -> None:
    # If Prefect stopped calling _submit_run, the worker would fall back to the stock submission (a
    # process run per flow run through `run`): slower, and the override would be dead code.
    assert "self._submit_run" in inspect.getsource(BaseWorker._submit_scheduled_flow_runs)
    assert "self._runs_task_group = " in inspect.getsource(BaseWorker.setup)
    assert "self._has_successfully_synced = True" in inspect.getsource(BaseWorker._initialize_after_sync)


def test_the_worker_never_replaces_prefects_process_worker() -> None:
    assert BaseWorker.get_worker_class_from_type("process") is ProcessWorker
    assert BaseWorker.get_worker_class_from_type("silotune-inprocess") is InProcessWorker
    assert InProcessWorker.type == "process"  # it serves the same pools the stock worker does
    assert FencedWorker.registry_key is None  # the abstract fence itself is not registered


def _fenced_names() -> set[str]:
    return {*PRIVATE_MEMBERS, *OBSERVER_MEMBERS}


def test_no_module_outside_the_fence_reaches_prefects_private_api() -> None:
    """Only ops/prefect_private.py names a fenced member or imports from a private Prefect module."""
    fenced = _fenced_names()
    private_module = re.compile(r"^prefect(_aws)?(\.\w+)*\._")
    found = []
    for folder in ("ops", "flows", "tasks", "silotune", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == FENCE:
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
                if isinstance(node, ast.Attribute) and node.attr in fenced:
                    found.append(f"{where} uses {node.attr}")
                elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in fenced:
                    found.append(f"{where} defines {node.name}")
                elif isinstance(node, ast.ImportFrom) and private_module.match(node.module or ""):
                    found.append(f"{where} imports {node.module}")
                elif isinstance(node, ast.Import):
                    found += [f"{where} imports {a.name}" for a in node.names if private_module.match(a.name)]
    assert not found, "Prefect's private API outside ops/prefect_private.py:\n" + "\n".join(found)


def test_prefect_is_pinned_to_the_tested_minor_version() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = SpecifierSet(next(d for d in deps if re.match(r"prefect[<>=]", d)).removeprefix("prefect"))
    assert spec == SpecifierSet(">=3.9.1,<3.10"), spec
    assert prefect.__version__ in spec
    pinned = re.search(r"^prefect==(\S+)$", (ROOT / "infra" / "constraints.txt").read_text(), re.M)
    assert pinned and pinned.group(1) in spec
    assert "prefect-version: " + pinned.group(1) in (ROOT / "deployments" / "prefect.yaml").read_text()
