"""The centralized baseline pools every silo's training data and gets the federation's budget."""

from __future__ import annotations

from pathlib import Path

from silotune.baselines import POOLED_SILO, centralized_config, local_only_config, pool_training_data
from silotune.config import parse_config
from silotune.data import encode_dataset, read_records


def _config(demo_data, tmp_path: Path):
    return parse_config(
        {
            "federation_id": "fed",
            "rounds": 2,
            "model": {"name_or_path": "tiny-llama", "max_seq_len": 128},
            "train": {"local_steps": 3, "batch_size": 4},
            "silos": [
                {"name": s, "train_path": str(demo_data[s]["train"]), "eval_path": str(demo_data[s]["eval"])}
                for s in ("clinic", "bank", "lab")
            ],
            "aggregation": {"min_silos": 2},
            "privacy": {"sample_dp": {"target_epsilon": 8.0, "delta": 1e-3}},
            "store": {"root": str(tmp_path / "store")},
        }
    )


def test_centralized_baseline_pools_every_silo_with_the_same_tokens_and_budget(
    demo_data, tokenizer, tmp_path: Path
) -> None:
    cfg = _config(demo_data, tmp_path)
    pooled = pool_training_data(cfg, tmp_path / "pooled" / "train.jsonl")
    cen = centralized_config(cfg, pooled)
    per_silo = [read_records(s.train_path) for s in cfg.silos]
    assert read_records(cen.silos[0].train_path) == [c for chats in per_silo for c in chats]
    assert [s.name for s in cen.silos] == [POOLED_SILO]

    def tokens(chats) -> int:
        return sum(len(e.input_ids) for e in encode_dataset(chats, tokenizer, cfg.model.max_seq_len))

    assert tokens(read_records(pooled)) == sum(tokens(c) for c in per_silo)
    # The same optimizer steps and examples: rounds × silos × local steps × batch size.
    assert cen.rounds == cfg.rounds and cen.train.batch_size == cfg.train.batch_size
    assert cen.train.local_steps == len(cfg.silos) * cfg.train.local_steps
    assert cen.train.learning_rate == cfg.train.learning_rate
    assert cen.privacy.sample_dp is None and cen.privacy.client_dp is None
    assert cen.aggregation.min_silos == 1 and cen.federation_id != cfg.federation_id
    # Per method (the privacy-utility grid): FFA-LoRA's own centralized run, under its own id.
    ffa = centralized_config(cfg, pooled, ffa_lora=True)
    assert ffa.ffa_lora and not cen.ffa_lora and ffa.federation_id == f"{cen.federation_id}-ffa-lora"
    assert ffa.train == cen.train and ffa.silos == cen.silos
    assert centralized_config(cfg, pooled, ffa_lora=False).federation_id == cen.federation_id

    local = local_only_config(cfg, "bank")
    assert [s.name for s in local.silos] == ["bank"] and local.train == cfg.train
    assert local.privacy == cfg.privacy


def test_baselines_take_the_plain_server_step_and_keep_their_fingerprint(demo_data, tmp_path: Path) -> None:
    """A server learning rate rescales one silo's own step, so a baseline drops it; a federation without
    one gives the same baseline as before (its fingerprint does not move, so stored baselines resume)."""
    plain = _config(demo_data, tmp_path)
    pooled = pool_training_data(plain, tmp_path / "pooled" / "train.jsonl")
    data = plain.model_dump(mode="json")
    data["aggregation"].update(server_optimizer="sgd", server_options={"lr": 2.0})
    fast = parse_config(data)
    for make in (lambda c: centralized_config(c, pooled), lambda c: local_only_config(c, "bank")):
        base = make(fast)
        assert base.aggregation.server_optimizer == "sgd" and base.aggregation.server_options == {}
        assert base.fingerprint() == make(plain).fingerprint()
