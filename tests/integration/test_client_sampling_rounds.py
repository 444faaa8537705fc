"""Client sampling in real rounds on the tiny model: plaintext, secure aggregation and CKKS.

Each round trains the silos drawn for it; under secure aggregation the roster (whose masks cancel)
is the round's draw, under CKKS the contributions a silo accepts are. The protected federations
compute the same mean as the plaintext one over the same draws.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from silotune import protection as prot
from silotune.aggregation.sampling import silos_of_round
from silotune.config import FederationConfig, parse_config
from silotune.federation import (
    aggregate_round,
    close_upload,
    commit_round,
    screen_uploads,
    start_federation,
    train_silo,
)
from silotune.keys import setup_local_keys
from silotune.protection import ProtocolRefusal
from silotune.records import ObjectRef, UpdateRecord
from silotune.store import FederationLayout, LocalStore, get_json, sha256

pytestmark = [pytest.mark.integration]

SILOS = ("north", "south", "east", "west", "centre")
DATA = ("clinic", "bank", "lab", "clinic", "bank")


def _config(tmp: Path, demo_data, **sections: Any) -> FederationConfig:
    raw: dict[str, Any] = {
        "federation_id": "sampled",
        "rounds": 2,
        "seed": 5,
        "model": {"name_or_path": "tiny-llama", "max_seq_len": 128},
        "lora": {"r": 4},
        "train": {"local_steps": 1, "batch_size": 2, "learning_rate": 5e-2},
        "silos": [
            {"name": s, "train_path": str(demo_data[d]["train"]), "private_dir": str(tmp / "silos" / s)}
            for s, d in zip(SILOS, DATA, strict=True)
        ],
        "aggregation": {"silos_per_round": 3, "min_silos": 2},
        "store": {"root": str(tmp / "store")},
        "tracking": {"kind": "none"},
        **sections,
    }
    raw["security"] = {"keys_dir": str(tmp / "coordinator"), **raw.get("security", {})}
    return parse_config(raw)


def _rounds(cfg: FederationConfig, adapter) -> Any:
    """Rounds through the library, as the coordinator flow runs them, over each round's draw."""
    store = LocalStore(cfg.store.root)
    state = start_federation(cfg, store, adapter)
    for r in range(cfg.rounds):
        drawn = silos_of_round(cfg, r)
        if cfg.security.protection == "secagg":
            for n in drawn:
                prot.secagg_advertise(cfg, n, r, store)
            for n in drawn:
                prot.secagg_share(cfg, n, r, store)
        records = [train_silo(cfg, n, r, state.global_ref, store, adapter, progress=False) for n in drawn]
        if cfg.security.protection == "secagg":
            for n in close_upload(cfg, store, r, records):
                prot.secagg_unmask(cfg, n, r, store)
        agg = aggregate_round(cfg, store, r, state.global_ref, records)
        state = commit_round(cfg, store, state, r, records, [], agg)
    return state


def test_sampled_rounds_plain_secagg_and_ckks(tmp_path: Path, demo_data, tiny_adapter) -> None:
    plain = _config(
        tmp_path / "plain",
        demo_data,
        security={"ffa_lora": True},
        aggregation={"silos_per_round": 3, "min_silos": 2, "options": {"weighted": False}},
    )
    draws = [silos_of_round(plain, r) for r in range(2)]
    assert draws[0] != draws[1] and all(len(d) == 3 for d in draws)
    state = _rounds(plain, tiny_adapter)
    store = LocalStore(plain.store.root)
    for r, h in enumerate(state.history):
        assert h.sampled == draws[r] and h.included == draws[r]
        assert get_json(store, FederationLayout("sampled").manifest(r))["sampled"] == draws[r]
    reference = prot.load_global(plain, SILOS[0], state.global_ref.key, state.global_ref.sha256, store)

    # A silo that was not drawn refuses to train, and an upload from it would be screened out.
    outsider = sorted(set(SILOS) - set(draws[0]))[0]
    round_0 = get_json(store, FederationLayout("sampled").manifest(0))["objects"]["global_in"]
    with pytest.raises(ProtocolRefusal, match="not among the silos drawn"):
        train_silo(plain, outsider, 0, ObjectRef(**round_0), store, tiny_adapter, progress=False)

    for protection in ("secagg", "ckks"):
        cfg = _config(tmp_path / protection, demo_data, security={"protection": protection, "signing": True})
        setup_local_keys(cfg)
        st = _rounds(cfg, tiny_adapter)
        assert [h.included for h in st.history] == draws, protection
        got = prot.load_global(
            cfg, draws[1][0], st.global_ref.key, st.global_ref.sha256, LocalStore(cfg.store.root)
        )
        worst = max(float((reference[k] - got[k]).abs().max()) for k in reference)
        assert worst < 1e-5, (protection, worst)


def test_coordinator_screens_out_an_upload_from_an_undrawn_silo(tmp_path: Path, demo_data) -> None:
    cfg = _config(tmp_path, demo_data)
    store = LocalStore(cfg.store.root)
    outsider = sorted(set(SILOS) - set(silos_of_round(cfg, 0)))[0]
    key = FederationLayout("sampled").update(0, outsider, "safetensors")
    store.put(key, b"x")
    rec = UpdateRecord(
        silo=outsider, round=0, update=ObjectRef(key=key, sha256=sha256(b"x")), num_examples=1, train={}
    )
    valid, excluded = screen_uploads(cfg, store, 0, [rec])
    assert not valid and "not drawn for round 1" in excluded[outsider]


@pytest.mark.usefixtures("prefect_api")
def test_the_flow_runs_only_the_drawn_silos(tmp_path: Path, demo_data) -> None:
    from flows.federated_training import federated_training

    cfg = _config(tmp_path, demo_data, rounds=1, evaluation={"max_examples": 2})
    cfg = parse_config(
        {
            **cfg.model_dump(mode="json"),
            "silos": [
                {**s.model_dump(mode="json"), "eval_path": str(demo_data[d]["eval"])}
                for s, d in zip(cfg.silos, DATA, strict=True)
            ],
        }
    )
    out = federated_training(cfg)
    drawn = silos_of_round(cfg, 0)
    (h,) = out["history"]
    assert h.included == drawn and h.sampled == drawn and h.excluded == {}
    # The round's output is evaluated by every silo once the federation ends.
    assert set(h.eval) == set(SILOS)
