"""EleutherAI's lm-evaluation-harness on the base model plus an adapter, with tasks made from holdouts.

No hub is reachable from a silo, so the tasks come from the silos' own holdout files: one
``generate_until`` task per silo (``silotune_<silo>``) whose YAML points at the local ``.jsonl``,
prompts with the model's chat template, decodes greedily and scores each answer by exact match,
ROUGE-L and chrF (:func:`silotune.evaluation.text_metrics`, computed locally). The YAML files and
their metric module are written to a folder that the harness's ``TaskManager`` includes, next to the
harness's own task registry: a user with hub access adds any standard task by its name
(``--harness silotune_clinic,hellaswag``) and the harness fetches that task's data as usual.

``holdouts`` in a task list expands to every generated task.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from silotune.config import FederationConfig
from silotune.data import read_records
from silotune.errors import ConfigError
from silotune.store import FederationLayout

HOLDOUTS = "holdouts"
_METRICS_MODULE = "silotune_harness_metrics"
_METRICS_SOURCE = '''"""Per-example metrics of the silotune holdout tasks (written by silotune.harness)."""

from silotune.evaluation import text_metrics


def process_results(doc, results):
    prediction = results[0].strip()
    reference = doc["response"].strip()
    rouge_l, chrf = text_metrics([prediction], [reference])
    return {"exact_match": float(prediction == reference), "rouge_l": rouge_l, "chrf": chrf}
'''
METRICS = ("exact_match", "rouge_l", "chrf")


def task_name(silo: str) -> str:
    return f"silotune_{silo.replace('-', '_')}"


def write_holdout_tasks(
    holdouts: Mapping[str, str | Path], folder: str | Path, *, max_gen_toks: int = 64
) -> list[str]:
    """Write one harness task per silo holdout under ``folder``; returns the task names.

    Each holdout is rewritten as ``{"instruction", "response"}`` records (the single-turn form the
    task's prompt and target read), so any format :func:`silotune.data.read_records` accepts works.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{_METRICS_MODULE}.py").write_text(_METRICS_SOURCE)
    names = []
    for silo, path in holdouts.items():
        rows = []
        for chat in read_records(path):
            user = [m["content"] for m in chat if m["role"] == "user"]
            answer = [m["content"] for m in chat if m["role"] == "assistant"]
            if user and answer:
                rows.append({"instruction": user[-1], "response": answer[-1]})
        if not rows:
            raise ConfigError(f"silo {silo}: holdout {path} has no single-turn record for the harness")
        data = out / f"{task_name(silo)}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = {
            "task": task_name(silo),
            "tag": ["silotune_holdouts"],
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
            "test_split": "test",
            "output_type": "generate_until",
            "doc_to_text": "{{instruction}}",
            "doc_to_target": "{{response}}",
            "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": max_gen_toks},
            "process_results": f"!function {_METRICS_MODULE}.process_results",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in METRICS],
            "metadata": {"version": 1.0, "silo": silo},
        }
        text = yaml.safe_dump(spec, sort_keys=False)
        # `!function` is the harness's YAML tag for a Python callable; safe_dump would quote it.
        text = text.replace(
            f"'!function {_METRICS_MODULE}.process_results'", f"!function {_METRICS_MODULE}.process_results"
        )
        (out / f"{task_name(silo)}.yaml").write_text(text)
        names.append(task_name(silo))
    return names


def expand_tasks(requested: Sequence[str], generated: Sequence[str]) -> list[str]:
    """The task list with ``holdouts`` replaced by every generated task (order kept, no duplicates)."""
    out: list[str] = []
    for t in requested:
        for name in generated if t == HOLDOUTS else [t]:
            if name not in out:
                out.append(name)
    if not out:
        raise ConfigError("--harness: no task named")
    return out


def run_harness(
    model_path: str | Path,
    tasks: Sequence[str],
    task_dir: str | Path,
    *,
    adapter_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Run the harness on the base model at ``model_path`` (plus the PEFT adapter in ``adapter_dir``)
    with the chat template; returns ``{task: {metric: value}}`` (the harness's ``metric,filter`` keys
    reduced to the metric name; standard errors dropped)."""
    # lm-eval imports datasets, evaluate and its task registry (seconds): only this command pays for it.
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir))
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise ConfigError(
            f"--harness: unknown task(s) {', '.join(unknown)}; generated here: "
            f"{', '.join(sorted(p.stem for p in Path(task_dir).glob('*.yaml')))}, or any task of the harness"
        )
    lm = HFLM(
        pretrained=str(model_path),
        peft=str(adapter_dir) if adapter_dir is not None else None,
        batch_size=batch_size,
        device="cpu",
        dtype="float32",
    )
    res: dict[str, Any] = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        apply_chat_template=True,
        limit=limit,
        log_samples=False,
        bootstrap_iters=0,
    )
    out: dict[str, dict[str, float]] = {}
    for task, metrics in res["results"].items():
        vals = {}
        for key, v in metrics.items():
            name = key.split(",")[0]
            if (
                isinstance(v, (int, float))
                and not name.endswith("_stderr")
                and name not in ("alias", "sample_len")
            ):
                vals[name] = float(v)
        out[task] = vals
    return out


def harness_metrics(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Flat ``harness.<task>.<metric>`` metrics, as logged to MLflow."""
    return {f"harness.{t}.{m}": v for t, ms in results.items() for m, v in ms.items()}


def harness_markdown(results: Mapping[str, Mapping[str, float]], *, title: str) -> str:
    metrics = sorted({m for ms in results.values() for m in ms})
    lines = [f"# {title}", "", "| task | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for t, ms in results.items():
        lines.append(f"| {t} | " + " | ".join(f"{ms[m]:.4f}" if m in ms else "-" for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def final_adapter_dir(config: FederationConfig) -> Path | None:
    """The federation's published final adapter, if it is a local folder (else None: name one)."""
    if config.store.kind != "local":
        return None
    folder = Path(config.store.root) / FederationLayout(config.federation_id).final("")
    return folder if (folder / "adapter_config.json").is_file() else None
