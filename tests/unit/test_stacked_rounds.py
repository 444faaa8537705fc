"""aggregation.lora_merge 'stack' (FLoRA): exact merges of LoRA/QLoRA silos of ranks 4, 8, 16, round by round."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from silotune.config import parse_config
from silotune.errors import ConfigError, UpdateError
from silotune.methods import stacked

RANKS = {"clinic": 4, "bank": 8, "lab": 16}


def _raw(tmp: Path, demo_data, **over):
    silos = []
    for name, rank in RANKS.items():
        silo = {
            "name": name,
            "train_path": str(demo_data[name]["train"]),
            "eval_path": str(demo_data[name]["eval"]),
        }
        if rank != 8:
            silo["method"] = {"name": "lora", "options": {"rank": rank}}
        else:  # a QLoRA silo: the merged update rides on its 4-bit base as a hook, not as new weights
            silo["method"] = {"name": "qlora"}
        silos.append(silo)
    raw = {
        "federation_id": "stk",
        "seed": 3,
        "model": {"name_or_path": "tiny-llama", "max_seq_len": 96},
        "lora": {"r": 8, "alpha": 16},
        "train": {"local_steps": 1, "batch_size": 4, "learning_rate": 5e-2},
        "silos": silos,
        "aggregation": {"lora_merge": "stack"},
        "evaluation": {"max_examples": 8},
        "store": {"root": str(tmp / "store")},
        "tracking": {"kind": "none"},
    }
    raw.update(over)
    return raw


def _dense(factors: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """s · B @ A per module, the obvious way (float64)."""
    mods = sorted(k.removesuffix(".lora_A.weight") for k in factors if k.endswith(".lora_A.weight"))
    return {
        m: scaling * factors[m + ".lora_B.weight"].double() @ factors[m + ".lora_A.weight"].double()
        for m in mods
    }


def test_two_stacked_rounds_merge_exactly_and_the_second_starts_from_the_merge(
    tmp_path: Path, demo_data, monkeypatch: pytest.MonkeyPatch
) -> None:
    from silotune.federation import aggregate_round, commit_round, evaluate_silo, start_federation, train_silo
    from silotune.store import LocalStore, get_tensors
    from tasks.runtime import MODELS, adapter_for

    bases: list[dict[str, torch.Tensor]] = []  # the merged base each silo trained or evaluated on
    original = stacked.merged_base

    def spy(adapter, merged):
        bases.append({k: v.clone() for k, v in merged.items()})
        return original(adapter, merged)

    monkeypatch.setattr(stacked, "merged_base", spy)
    monkeypatch.setattr(MODELS, "capacity", 4)  # one tiny model per rank, loaded once (not per silo turn)
    cfg = parse_config(_raw(tmp_path, demo_data))
    assert {s: cfg.lora_for(s).r for s in RANKS} == RANKS  # 16 > lora.r is allowed: a rank of its own
    store = LocalStore(cfg.store.root)
    state = start_federation(cfg, store, adapter_for(cfg))
    g0 = get_tensors(store, state.global_ref.key)
    assert stacked.is_merged(g0) and all(float(v.abs().sum()) == 0 for v in g0.values())

    for round_ in range(2):
        g_in = get_tensors(store, state.global_ref.key)
        bases.clear()
        recs = [
            train_silo(cfg, s, round_, state.global_ref, store, adapter_for(cfg, s), progress=False)
            for s in RANKS
        ]
        # Every silo trained on this round's global: zero in round 1, round 1's merge in round 2.
        assert len(bases) == len(RANKS) and all(torch.equal(b[k], g_in[k]) for b in bases for k in g_in), (
            "a silo did not train on the merged global"
        )
        uploads = {r.silo: get_tensors(store, r.update.key) for r in recs}
        for silo, up in uploads.items():  # each silo uploads its whole factors, of its own rank
            assert {v.shape[0] for k, v in up.items() if k.endswith("lora_A.weight")} == {RANKS[silo]}
        agg = aggregate_round(cfg, store, round_, state.global_ref, recs)
        assert agg.included == list(RANKS)
        g_out = get_tensors(store, agg.next_global.key)
        n = sum(r.num_examples for r in recs)
        want: dict[str, torch.Tensor] = {}
        for r in recs:  # Σ p_k s_k B_k A_k with p_k = n_k / n and s_k = alpha_k / r_k
            spec = cfg.lora_for(r.silo)
            for m, d in _dense(uploads[r.silo], spec.alpha / spec.r).items():
                want[m] = want.get(m, 0) + (r.num_examples / n) * d
        assert sorted(want) == stacked.modules(g_out)
        merged = {
            m: g_out[stacked.merged_key(m)].double() - g_in[stacked.merged_key(m)].double() for m in want
        }
        err = max(float((merged[m] - want[m]).abs().max()) for m in want)
        assert err < 1e-5, err
        print(f"round {round_ + 1}: max |merged - Σ p_k s_k B_k A_k| = {err:.2e}")
        assert max(float(w.abs().max()) for w in want.values()) > 1e-3  # training moved something
        state = commit_round(cfg, store, state, round_, recs, [], agg)
        if round_ == 0:
            g1 = g_out
    assert state.completed_rounds == 2
    assert any(bool(v.any()) for v in g1.values())  # so round 2's check above compared a real merge

    # Round 2 started from the merged weights: a silo's forward pass under the merged base, with the fresh
    # LoRA (B = 0) it starts from, is the base model's with W + ΔW, and differs from the bare base's.
    adapter = adapter_for(cfg, "clinic")
    fresh = stacked.fresh_lora(adapter, 0)
    adapter.load_state(fresh)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        bare = adapter.model(input_ids=ids, attention_mask=mask).logits
        with stacked.merged_base(adapter, g1):
            hooked = adapter.model(input_ids=ids, attention_mask=mask).logits
        base = adapter.model.get_base_model()
        saved = {}
        for m in stacked.modules(g1):
            layer = stacked.base_layer(adapter.model, m)
            saved[m] = layer.weight.detach().clone()
            layer.weight.data += g1[stacked.merged_key(m)]
        try:
            explicit = base(input_ids=ids, attention_mask=mask).logits
        finally:
            for m, w in saved.items():
                stacked.base_layer(adapter.model, m).weight.data.copy_(w)
        again = adapter.model(input_ids=ids, attention_mask=mask).logits
    assert float((hooked - bare).abs().max()) > 1e-4
    assert torch.allclose(hooked, explicit, atol=1e-5)
    assert torch.equal(again, bare)  # the hooks are gone and the shared base is untouched
    ev = evaluate_silo(cfg, "lab", 1, state.global_ref, store, adapter_for(cfg, "lab"))
    assert ev is not None and ev.result["loss"] > 0

    # The final adapter: exported as a PEFT folder (the merge, by SVD); personalisation says why not.
    from silotune.export import write_final_adapter
    from silotune.personalize import personalize_silo

    folder = write_final_adapter(cfg, store, tmp_path / "export")
    exported = get_tensors(LocalStore(folder), "adapter_model.safetensors")
    m = stacked.modules(g_out)[0]
    product = exported[m + ".lora_B.weight"] @ exported[m + ".lora_A.weight"]
    assert torch.allclose(product, g_out[stacked.merged_key(m)], atol=1e-5)
    assert (folder / "adapter_config.json").is_file() and (folder / "tokenizer_config.json").is_file()
    with pytest.raises(ConfigError, match=r"stacks LoRA ranks .* export it"):
        personalize_silo(cfg, "clinic", store, adapter_for(cfg, "clinic"))

    # The membership audit runs the merged model as its target and the bare base as its reference
    # (were both the same model, every reference score, reference loss − target loss, would be 0).
    from silotune.audit.run import audit_federation

    report = audit_federation(cfg, store, adapter_for(cfg), max_examples=4, batch_size=4)
    assert set(report.mia) == {"loss", "reference"} and report.rounds == 2
    assert max(abs(x) for x in report.mia["reference"].member_scores) > 1e-4


def test_merged_global_exports_as_an_exact_peft_lora(tmp_path: Path) -> None:
    from silotune.config import LoraSpec

    gen = torch.Generator().manual_seed(0)
    merged = {
        stacked.merged_key("base_model.model.model.layers.0.self_attn.q_proj"): (
            torch.randn(12, 3, generator=gen) @ torch.randn(3, 10, generator=gen)
        ),
        stacked.merged_key("base_model.model.model.layers.0.self_attn.v_proj"): torch.zeros(6, 10),
    }
    state, config = stacked.merged_to_lora(merged, LoraSpec(r=8))
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert state[q + ".lora_A.weight"].shape == (3, 10)  # the numerical rank, not lora.r
    assert torch.allclose(
        state[q + ".lora_B.weight"] @ state[q + ".lora_A.weight"], merged[q + stacked.MERGED], atol=1e-5
    )
    assert config.rank_pattern["model.layers.0.self_attn.q_proj"] == 3
    assert config.alpha_pattern["model.layers.0.self_attn.q_proj"] == 3.0  # scaling 1
    v = "base_model.model.model.layers.0.self_attn.v_proj"
    assert float(state[v + ".lora_B.weight"].abs().sum()) == 0


def test_a_stacked_global_publishes_as_a_peft_adapter_equal_to_the_merge(tmp_path: Path, demo_data) -> None:
    from peft import PeftModel

    from silotune.methods.base import MethodOptions, load_base
    from tasks.runtime import adapter_for

    cfg = parse_config(_raw(tmp_path, demo_data))
    adapter = adapter_for(cfg)
    gen = torch.Generator().manual_seed(1)
    merged = {
        k: 0.01 * torch.randn(v.shape[0], 5, generator=gen) @ torch.randn(5, v.shape[1], generator=gen)
        for k, v in stacked.initial_merged(adapter).items()
    }
    folder = stacked.write_lora_folder(merged, cfg.lora, str(adapter.model_path), tmp_path / "adapter")
    base = load_base(adapter.model_path, MethodOptions())
    weights = {
        m: stacked.base_layer(base, m.removeprefix("base_model.model.")).weight.detach().clone()
        for m in stacked.modules(merged)
    }
    model = PeftModel.from_pretrained(base, folder).merge_and_unload()
    for m, w in weights.items():
        got = model.get_submodule(m.removeprefix("base_model.model.")).weight.detach()
        assert torch.allclose(got - w, merged[stacked.merged_key(m)], atol=1e-5)


def test_a_stacked_upload_of_the_wrong_rank_is_excluded(tmp_path: Path, demo_data) -> None:
    from silotune.aggregation import ClientUpdate
    from silotune.protection.none import check_factors

    merged = {stacked.merged_key("m"): torch.zeros(6, 10)}
    ok = {"m.lora_A.weight": torch.ones(4, 10), "m.lora_B.weight": torch.ones(6, 4)}
    check_factors(ClientUpdate(silo="a", delta=ok, num_examples=3), merged, 4)
    with pytest.raises(UpdateError, match=r"silo 'a'.*rank 8"):
        check_factors(ClientUpdate(silo="a", delta=ok, num_examples=3), merged, 8)
    bad = {**ok, "m.lora_B.weight": torch.full((6, 4), float("nan"))}
    with pytest.raises(UpdateError, match="non-finite"):
        check_factors(ClientUpdate(silo="a", delta=bad, num_examples=3), merged, 4)
    with pytest.raises(UpdateError, match="missing"):
        check_factors(
            ClientUpdate(silo="a", delta={"m.lora_A.weight": ok["m.lora_A.weight"]}, num_examples=3),
            merged,
            4,
        )


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (
            {"security": {"protection": "secagg"}},
            r"lora_merge: 'stack' needs security.protection 'none', not 'secagg'",
        ),
        (
            {"security": {"protection": "ckks"}},
            r"lora_merge: 'stack' needs security.protection 'none', not 'ckks'",
        ),
        ({"method": {"name": "ia3"}}, r"lora_merge: 'stack' merges LoRA factors, but method\(s\) \['ia3'\]"),
        ({"security": {"ffa_lora": True}}, r"security.ffa_lora: true with aggregation.lora_merge 'stack'"),
        (
            {"aggregation": {"lora_merge": "stack", "name": "median"}},
            r"aggregation.name: 'median' with aggregation.lora_merge 'stack'",
        ),
        (
            {
                "privacy": {"client_dp": {"noise_multiplier": 1.0, "clip_norm": 1.0}},
                "aggregation": {"lora_merge": "stack", "options": {"weighted": False}, "min_silos": 2},
            },
            r"privacy.client_dp: with aggregation.lora_merge 'stack'",
        ),
        ({"aggregation": {"lora_merge": "zip"}}, r"aggregation.lora_merge: Input should be 'pad' or 'stack'"),
    ],
)
def test_stacking_is_refused_where_it_cannot_apply(tmp_path: Path, demo_data, over, message) -> None:
    raw = _raw(tmp_path, demo_data, **over)
    if over.get("method", {}).get("name") == "ia3":
        for s in raw["silos"]:
            s.pop("method", None)
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_stacking_config_defaults_and_fingerprint(tmp_path: Path, demo_data) -> None:
    raw = _raw(tmp_path, demo_data)
    cfg = parse_config(raw)
    assert cfg.aggregation.lora_merge == "stack"
    pad = parse_config({**raw, "aggregation": {}, "lora": {"r": 16, "alpha": 32}})
    assert pad.aggregation.lora_merge == "pad"  # default: today's zero-padding
    explicit = parse_config({**raw, "aggregation": {"lora_merge": "pad"}, "lora": {"r": 16, "alpha": 32}})
    assert explicit.fingerprint() == pad.fingerprint()  # the default stays out of the hash (resume)
    assert parse_config({**raw, "lora": {"r": 16, "alpha": 32}}).fingerprint() != pad.fingerprint()
    # Under padding a silo trains a slice: a rank above lora.r is still refused there.
    with pytest.raises(ConfigError, match=r"lab's rank 16 exceeds the federation's lora\.r=8"):
        parse_config({**raw, "aggregation": {}})
    # Sample-level DP (DP-SGD) is local training: it stays allowed.
    parse_config({**raw, "privacy": {"sample_dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}})


def test_stacked_update_is_the_weighted_sum_of_products_in_any_order() -> None:
    from silotune.aggregation.stacking import stacked_update

    gen = torch.Generator().manual_seed(4)
    states = [
        {
            "m.lora_A.weight": torch.randn(r, 7, generator=gen),
            "m.lora_B.weight": torch.randn(5, r, generator=gen),
        }
        for r in (4, 8, 16)
    ]
    w, s = [0.2, 0.3, 0.5], [2.0, 2.0, 0.5]
    got = stacked_update(states, w, scalings=s)["m"]
    want = sum(
        wi * si * st["m.lora_B.weight"].double() @ st["m.lora_A.weight"].double()
        for wi, si, st in zip(w, s, states, strict=True)
    )
    assert torch.allclose(got, want, atol=1e-12)
    order = [2, 0, 1]  # permutation invariance
    again = stacked_update([states[i] for i in order], [w[i] for i in order], scalings=[s[i] for i in order])
    assert torch.allclose(again["m"], got, atol=1e-12)
    one = stacked_update(states[:1], [1.0], scalings=[2.0])["m"]  # one silo: its own product
    assert torch.allclose(
        one, 2.0 * states[0]["m.lora_B.weight"].double() @ states[0]["m.lora_A.weight"].double()
    )
    zero = [{k: torch.zeros_like(v) if "lora_B" in k else v for k, v in st.items()} for st in states]
    assert float(stacked_update(zero, w, scalings=s)["m"].abs().max()) == 0  # fresh LoRAs merge nothing
