"""The contract every registered post-training method runs through (one parametrised table).

Each method × one federated round on the tiny model through the library's round
functions (start → train_silo × 2 → aggregate_round → evaluate_silo):

- local training lowers the loss, and the new global lowers the holdout loss;
- what a silo uploads has exactly the method's exchanged keys and shapes, and
  round-trips through the object store bit for bit;
- the final artifact is written in the method's native format and loads back
  onto a fresh base, computing the same logits as the trained model;
- the method's declared memory footprint counts exactly the parameters it trains.

Every registered method also declares the facts the rest of silotune reads
(Table 1 row, defenses, FFA-LoRA, plan choices), and no library module outside
``silotune/methods`` compares against a method's name. The per-method runtimes of
the round are printed by ``tests/unit/conftest.py`` at the end of the session.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from silotune.adapters import AdapterModel, apply_delta
from silotune.config import FederationConfig, parse_config
from silotune.data import encode_dataset, read_records
from silotune.evaluation import evaluate
from silotune.federation import aggregate_round, evaluate_silo, start_federation, train_silo
from silotune.memory_estimate import ModelShape
from silotune.methods import METHODS, Defense, Method, Payload, PlanChoice, get_method, parse_options
from silotune.openness import Table1Row
from silotune.store import FederationLayout, LocalStore, get_tensors

# Per-method local learning rates for the tiny random model (full FT moves every weight: smaller).
LR = {"lora": 0.1, "qlora": 0.1, "ia3": 0.3, "prompt_tuning": 1e-2, "full": 3e-3}
OPTIONS: dict[str, dict[str, Any]] = {"prompt_tuning": {"num_virtual_tokens": 8}}
SILOTUNE = Path(__file__).resolve().parents[2] / "silotune"


def _config(tmp: Path, demo_data, method: str, **extra: Any) -> FederationConfig:
    return parse_config(
        {
            "federation_id": f"contract-{method.replace('_', '-')}",
            "rounds": 1,
            "seed": 3,
            "model": {"name_or_path": "tiny-llama", "max_seq_len": 96},
            "lora": {"r": 4},
            "method": {"name": method, "options": OPTIONS.get(method, {})},
            "train": {"local_steps": 6, "batch_size": 4, "learning_rate": LR[method]},
            "silos": [
                {"name": s, "train_path": str(demo_data[s]["train"]), "eval_path": str(demo_data[s]["eval"])}
                for s in ("clinic", "bank")
            ],
            "aggregation": {"min_silos": 2},
            "store": {"root": str(tmp / "store")},
            "tracking": {"kind": "none"},
            **extra,
        }
    )


def test_registry_lists_every_method_of_table_1() -> None:
    assert set(METHODS.names()) == {"full", "ia3", "lora", "prompt_tuning", "qlora"}
    payloads = {n: get_method(n).payload for n in METHODS.names()}
    assert payloads["full"] is Payload.FULL_WEIGHTS and payloads["prompt_tuning"] is Payload.SOFT_PROMPT
    assert {payloads[n] for n in ("lora", "qlora", "ia3")} == {Payload.ADAPTER}


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_declares_its_facts(method: str) -> None:
    m = get_method(method)
    assert isinstance(m, Method) and m.name == method
    assert set(m.defenses) == set(Defense) and isinstance(m.table1, Table1Row)
    assert m.ffa_lora <= m.uses_lora_section  # FFA-LoRA freezes the A of a LoRA shape
    for gpu in (False, True):
        choices = m.plan_choices(gpu=gpu)
        assert all(isinstance(c, PlanChoice) for c in choices)
        # Every option plan would write is one the method accepts.
        for c in choices:
            parse_options(m, {**c.options, "gradient_checkpointing": True})
    assert m.plan_learning_rate > 0


def _compared_strings(tree: ast.AST) -> set[str]:
    """String constants that a comparison (==, !=, in, not in) checks against."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                elts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                out |= {e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return out


def test_no_library_module_outside_methods_compares_method_names() -> None:
    """Methods own their facts: the rest of the library reads them from the registry, never by name."""
    names = set(METHODS.names())
    offenders = {
        str(path.relative_to(SILOTUNE)): sorted(hits)
        for path in SILOTUNE.rglob("*.py")
        if "methods" not in path.relative_to(SILOTUNE).parts
        and (hits := _compared_strings(ast.parse(path.read_text())) & names)
    }
    assert offenders == {}


@pytest.mark.parametrize("method", sorted(LR))
def test_method_contract_one_federated_round(method: str, tmp_path: Path, demo_data) -> None:
    cfg = _config(tmp_path, demo_data, method)
    store = LocalStore(cfg.store.root)
    adapter = AdapterModel.create(cfg.model, cfg.lora, seed=0, method=cfg.method)
    template = adapter.state()
    # The memory footprint the method declares counts exactly what it trains.
    impl = get_method(method)
    shape = ModelShape.from_hf_config(json.loads((adapter.model_path / "config.json").read_text()))
    footprint = impl.footprint(shape, parse_options(impl, cfg.method.options), cfg.lora)
    assert footprint.trainable_params == adapter.num_trainable(), method

    state = start_federation(cfg, store, adapter)
    g0 = get_tensors(store, state.global_ref.key, expected_sha256=state.global_ref.sha256)
    assert {k: v.shape for k, v in g0.items()} == {k: v.shape for k, v in template.items()}
    # The first global is drawn from the seed alone: a second draw is identical.
    again = adapter.initial_state(cfg.seed)
    assert all(torch.equal(again[k], g0[k]) for k in g0)

    before = [evaluate_silo(cfg, s, -1, state.global_ref, store, adapter) for s in ("clinic", "bank")]
    own = encode_dataset(read_records(cfg.silos[0].train_path), adapter.tokenizer, cfg.model.max_seq_len)[:16]
    records = []
    for s in ("clinic", "bank"):
        records.append(train_silo(cfg, s, 0, state.global_ref, store, adapter, progress=False))
        if s == "clinic":  # local training lowers the loss on the silo's own data
            trained = evaluate(adapter, own).loss
            assert trained < evaluate(adapter, own, state=g0).loss, method
    for rec in records:
        stored = get_tensors(store, rec.update.key, expected_sha256=rec.update.sha256)
        assert set(stored) == set(template) and all(stored[k].shape == template[k].shape for k in stored)
        assert rec.train["update_bytes"] == sum(t.numel() * t.element_size() for t in stored.values())
    # The last silo's local weights (still in the model) are the global plus its stored delta.
    local = adapter.state()
    last = get_tensors(store, records[-1].update.key)
    rebuilt = apply_delta(g0, last)
    assert all(torch.allclose(rebuilt[k], local[k], atol=1e-6, rtol=0) for k in local)

    agg = aggregate_round(cfg, store, 0, state.global_ref, records)
    assert agg.included == ["clinic", "bank"] and agg.delta_norm > 0
    g1 = get_tensors(store, agg.next_global.key, expected_sha256=agg.next_global.sha256)
    after = [evaluate_silo(cfg, s, 0, agg.next_global, store, adapter) for s in ("clinic", "bank")]
    loss_before = sum(e.result["loss"] for e in before if e)
    loss_after = sum(e.result["loss"] for e in after if e)
    assert loss_after < loss_before, (method, loss_before, loss_after)

    # The published artifact loads back onto a fresh base and computes the same function.
    folder = adapter.save_pretrained(tmp_path / "artifact", g1)
    reloaded = impl.load_artifact(folder, adapter.model_path, parse_options(impl, cfg.method.options))
    ids = torch.tensor([[1, 20, 300, 4000, 5]])
    mask = torch.ones_like(ids)
    adapter.model.eval()
    reloaded.eval()
    with torch.no_grad():
        a = adapter.model(input_ids=ids, attention_mask=mask).logits
        b = reloaded(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a, b, atol=1e-4), (method, float((a - b).abs().max()))
    assert FederationLayout(cfg.federation_id).global_adapter(1) == agg.next_global.key


def test_qlora_and_lora_silos_federate_together(tmp_path: Path, demo_data) -> None:
    """Heterogeneous bit-widths: a 4-bit-NF4 silo and a full-precision silo exchange the same adapter."""
    from tasks.runtime import adapter_for

    cfg = _config(tmp_path, demo_data, "lora")
    data = cfg.model_dump(mode="json")
    data["silos"][1]["method"] = {"name": "qlora", "options": {"bits": 4}}
    cfg = parse_config(data)
    store = LocalStore(cfg.store.root)
    state = start_federation(cfg, store, adapter_for(cfg))
    recs = [
        train_silo(cfg, s, 0, state.global_ref, store, adapter_for(cfg, s), progress=False)
        for s in ("clinic", "bank")
    ]
    assert (
        type(
            adapter_for(cfg, "bank").model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
        ).__name__
        == "Linear4bit"
    )
    agg = aggregate_round(cfg, store, 0, state.global_ref, recs)
    assert agg.included == ["clinic", "bank"]


def test_mismatched_exchanges_are_refused(tmp_path: Path, demo_data) -> None:
    from silotune.errors import ConfigError

    data = _config(tmp_path, demo_data, "lora").model_dump(mode="json")
    data["silos"][1]["method"] = {"name": "full"}
    with pytest.raises(ConfigError, match="exchange different tensors"):
        parse_config(data)
    data["silos"][1]["method"] = {"name": "qlora", "options": {"bits": 3}}
    with pytest.raises(ConfigError, match=r"silos\.1\.method\.options\.bits"):
        parse_config(data)
    data["silos"][1]["method"] = {"name": "adalora"}
    with pytest.raises(ConfigError, match="unknown post-training method 'adalora'; known: full, ia3, lora"):
        parse_config(data)
