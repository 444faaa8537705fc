"""SCAFFOLD (silotune.aggregation.scaffold): the variate math by hand, the corrected step, the config.

Integration through rounds (plaintext, secure aggregation, crash and resume) is in
tests/integration/test_scaffold_rounds.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from silotune.aggregation import scaffold
from silotune.config import parse_config
from silotune.errors import ConfigError


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_option_ii_variate_update_matches_a_hand_computation() -> None:
    # K = 2 steps of η = 0.1: K·η = 0.2.
    c_i = {"w": _t(1.0, -2.0)}
    c = {"w": _t(0.5, 0.5)}
    delta = {"w": _t(-0.2, 0.1)}  # y_i - x
    new, delta_c = scaffold.silo_update(c_i, c, delta, steps=2, lr=0.1)
    # c_i+ = c_i - c + (x - y_i)/(Kη) = [1 - 0.5 + 0.2/0.2, -2 - 0.5 - 0.1/0.2] = [1.5, -3.0]
    assert torch.allclose(new["w"], _t(1.5, -3.0))
    # Δc_i = c_i+ - c_i = [0.5, -1.0], which is also -c - Δy/(Kη): no information beyond Δy and c
    assert torch.allclose(delta_c["w"], _t(0.5, -1.0))
    assert torch.allclose(delta_c["w"], -c["w"] - delta["w"] / 0.2)
    # the server: c + (|S|/N)·mean Δc, one silo of two included
    assert torch.allclose(scaffold.server_update(c, delta_c, included=1, total=2)["w"], _t(0.75, 0.0))
    assert torch.allclose(scaffold.server_update(c, delta_c, included=2, total=2)["w"], _t(1.0, -0.5))
    # the correction every local step subtracts (times η): c - c_i
    assert torch.allclose(scaffold.correction(c, c_i)["w"], _t(-0.5, 2.5))


def test_framing_carries_k_eta_delta_c_and_splits_back() -> None:
    delta = {"a": _t(0.01, -0.02), "b": _t(0.03)}
    delta_c = {"a": _t(0.5, -1.0), "b": _t(2.0)}
    framed = scaffold.frame(delta, delta_c, steps=10, lr=2e-3)
    assert set(framed) == {"a", "b", "scaffold.control/a", "scaffold.control/b"}
    assert torch.allclose(framed["scaffold.control/a"], _t(0.01, -0.02))  # K·η·Δc: delta-sized
    model, control = scaffold.split(framed, steps=10, lr=2e-3)
    assert model.keys() == delta.keys() and all(torch.equal(model[k], delta[k]) for k in delta)
    assert all(torch.allclose(control[k], delta_c[k]) for k in delta_c)
    # A sum of framed updates splits into the sums (what masking and FedAvg compute).
    other = scaffold.frame(delta, {k: -v for k, v in delta_c.items()}, steps=10, lr=2e-3)
    _, summed = scaffold.split({k: framed[k] + other[k] for k in framed}, steps=10, lr=2e-3)
    assert all(float(v.abs().max()) < 1e-6 for v in summed.values())
    with pytest.raises(ValueError, match="different tensors"):
        scaffold.split({"a": _t(1.0), "scaffold.control/b": _t(1.0)}, steps=1, lr=1.0)


def test_corrected_optimizer_steps_are_sgd_on_the_corrected_gradient() -> None:
    """With SGD the post-step hook gives exactly y <- y - η (g - c_i + c), step after step."""
    torch.manual_seed(0)
    target = torch.randn(5)
    c, c_i = {"w": torch.randn(5)}, {"w": torch.randn(5)}
    lr, steps = 0.05, 4
    w = torch.nn.Parameter(torch.zeros(5))
    opt = torch.optim.SGD([w], lr=lr)
    handle = scaffold.attach_correction(opt, [w], [scaffold.correction(c, c_i)["w"]], lr)
    ref = torch.zeros(5)
    for _ in range(steps):
        opt.zero_grad()
        ((w - target) ** 2).sum().backward()
        opt.step()
        g = 2 * (ref - target)
        ref = ref - lr * (g - c_i["w"] + c["w"])
    handle.remove()
    assert torch.allclose(w.detach(), ref, atol=1e-6)
    # Option II then recovers the mean corrected direction: c_i+ = c_i - c + (x - y)/(Kη).
    new, _ = scaffold.silo_update(c_i, c, {"w": w.detach()}, steps=steps, lr=lr)
    assert torch.allclose(new["w"], c_i["w"] - c["w"] - w.detach() / (steps * lr), atol=1e-6)
    # Removed: a further step is plain SGD.
    before = w.detach().clone()
    opt.zero_grad()
    ((w - target) ** 2).sum().backward()
    opt.step()
    assert torch.allclose(w.detach(), before - lr * 2 * (before - target), atol=1e-6)


def test_variates_are_checked_against_the_exchanged_tensors() -> None:
    ref = {"w": torch.zeros(2, 3)}
    scaffold.check_variate(scaffold.zeros(ref), ref, "c")
    for bad, what in (
        ({"w": torch.zeros(3, 2)}, "shape"),
        ({"v": torch.zeros(2, 3)}, "do not match"),
        ({"w": torch.full((2, 3), float("nan"))}, "non-finite"),
    ):
        with pytest.raises(ValueError, match=what):
            scaffold.check_variate(bad, ref, "c")


def _raw(**sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "federation_id": "sc",
        "model": {"name_or_path": "tiny-llama"},
        "silos": [{"name": "a", "train_path": "a.jsonl"}, {"name": "b", "train_path": "b.jsonl"}],
        "aggregation": {"algorithm": "scaffold"},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"aggregation": {"name": "median"}}, "aggregation.algorithm: scaffold updates the server variate"),
        (
            {"security": {"protection": "ckks"}},
            "aggregation.algorithm: scaffold updates the server variate from",
        ),
        ({"method": {"name": "ia3"}}, "corrects LoRA parameters; method(s) ['ia3']"),
        ({"train": {"processes": 2}}, "set train.processes: 1"),
    ],
)
def test_config_refuses_what_scaffold_cannot_run_with(sections: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_raw(**sections))
    assert message in str(err.value)


def test_config_accepts_scaffold_with_secagg_and_dp_and_keeps_old_fingerprints() -> None:
    cfg = parse_config(
        _raw(
            security={"protection": "secagg"},
            privacy={"client_dp": {"clip_norm": 0.1, "noise_multiplier": 0.5, "delta": 1e-3}},
        )
    )
    assert cfg.aggregation.algorithm == "scaffold"
    plain = parse_config({**_raw(), "aggregation": {}})
    explicit = parse_config({**_raw(), "aggregation": {"algorithm": "fedavg"}})
    assert plain.fingerprint() == explicit.fingerprint()  # the default stays out of the hash
    assert parse_config(_raw()).fingerprint() != plain.fingerprint()


# -- the silo's variates: which one counts, which server variate it accepts -----------------------------


def _fed(tmp_path, demo_data, **sections: Any):
    raw = _raw(**sections)
    raw["model"] = {"name_or_path": "tiny-llama", "max_seq_len": 128}
    raw["lora"] = {"r": 2, **sections.get("lora", {})}
    raw["train"] = {"local_steps": 2, "batch_size": 2, "learning_rate": 1e-2, **sections.get("train", {})}
    raw["silos"] = [
        {"name": s, "train_path": str(demo_data[s]["train"]), "private_dir": str(tmp_path / "silos" / s)}
        for s in ("clinic", "lab")
    ]
    raw["store"] = {"root": str(tmp_path / "store")}
    raw["tracking"] = {"kind": "none"}
    return parse_config(raw)


def test_a_silo_variate_counts_once_its_round_included_the_silo(tmp_path, demo_data) -> None:
    from silotune.federation.silo import silo_control
    from silotune.keys import SiloVault, write_private
    from silotune.store import FederationLayout, LocalStore, put_json, save_tensors

    cfg = _fed(tmp_path, demo_data)
    store, lay = LocalStore(cfg.store.root), FederationLayout(cfg.federation_id)
    template = {"w": torch.zeros(2)}
    folder = SiloVault.for_silo(cfg.silo("clinic")).control_folder(cfg.federation_id)
    for r, value in ((0, 1.0), (1, 2.0), (2, 3.0)):
        write_private(folder / f"{r:05d}.safetensors", save_tensors({"w": torch.full((2,), value)}))
    assert torch.equal(silo_control(cfg, "clinic", 1, store, template)["w"], torch.zeros(2))  # no manifest
    put_json(store, lay.manifest(0), {"included": ["clinic", "lab"]})
    put_json(store, lay.manifest(1), {"included": ["lab"]})  # clinic's round-2 update was excluded
    assert torch.equal(silo_control(cfg, "clinic", 1, store, template)["w"], torch.ones(2))
    assert torch.equal(silo_control(cfg, "clinic", 2, store, template)["w"], torch.ones(2))
    # round 3's own candidate (a crashed attempt of the round being trained) never counts for it
    put_json(store, lay.manifest(2), {"included": ["clinic", "lab"]})
    assert torch.equal(silo_control(cfg, "clinic", 2, store, template)["w"], torch.ones(2))
    assert torch.equal(silo_control(cfg, "clinic", 3, store, template)["w"], torch.full((2,), 3.0))


def test_a_silo_refuses_a_server_variate_that_belongs_to_another_global(tmp_path, demo_data) -> None:
    from silotune.federation.silo import server_control
    from silotune.protection import ProtocolRefusal
    from silotune.records import ObjectRef
    from silotune.store import FederationLayout, LocalStore, put_json, put_tensors

    cfg = _fed(tmp_path, demo_data)
    store, lay = LocalStore(cfg.store.root), FederationLayout(cfg.federation_id)
    template = {"w": torch.zeros(2)}
    sha = put_tensors(store, lay.control(0), {"w": torch.ones(2)})
    sent = ObjectRef(key=lay.global_adapter(1), sha256="a" * 64)
    objects = {"global_out": sent.model_dump(), "server_control": {"key": lay.control(0), "sha256": sha}}
    put_json(store, lay.manifest(0), {"included": ["clinic"], "objects": objects})
    assert torch.equal(server_control(cfg, "clinic", 1, store, sent, template)["w"], torch.ones(2))
    other = ObjectRef(key=lay.global_adapter(1), sha256="b" * 64)
    with pytest.raises(ProtocolRefusal, match="does not name the global it was sent"):
        server_control(cfg, "clinic", 1, store, other, template)
    put_json(store, lay.manifest(0), {"objects": {**objects, "server_control": {"key": "x", "sha256": sha}}})
    with pytest.raises(ProtocolRefusal, match="is not round 1's control variate key"):
        server_control(cfg, "clinic", 1, store, sent, template)


def test_under_client_dp_the_uploaded_variate_is_computed_from_the_released_delta(
    tmp_path, demo_data, tiny_adapter
) -> None:
    """K·η·Δc = -(Δy + K·η·c) with Δy the clipped, noised delta: Δc reveals nothing Δy does not."""
    from silotune.federation import start_federation, train_silo
    from silotune.store import LocalStore, get_tensors

    cfg = _fed(
        tmp_path,
        demo_data,
        aggregation={"options": {"weighted": False}},
        privacy={"client_dp": {"clip_norm": 0.01, "noise_multiplier": 0.5, "delta": 1e-3}},
        lora={"r": 4},
    )
    store = LocalStore(cfg.store.root)
    state = start_federation(cfg, store, tiny_adapter)
    rec = train_silo(cfg, "clinic", 0, state.global_ref, store, tiny_adapter, progress=False)
    delta, control = scaffold.split(get_tensors(store, rec.update.key), steps=2, lr=1e-2)
    assert all("lora_B" in k for k in delta)  # FFA-LoRA, on by default with client DP
    released_norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in delta.values())))
    assert released_norm > 0.01  # the noise is in what was released (clipped to 0.01 before it)
    for k, dy in delta.items():  # round 1: c = 0
        assert torch.allclose(2 * 1e-2 * control[k], -dy, atol=1e-7)
    own = _silo_variate(cfg, "clinic")
    assert all(torch.allclose(own[k], control[k]) for k in control)  # c_i+ = 0 + Δc, in its folder


def _silo_variate(cfg, silo: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    from silotune.keys import SiloVault

    folder = SiloVault.for_silo(cfg.silo(silo)).control_folder(cfg.federation_id)
    return dict(st_load((folder / "00000.safetensors").read_bytes()))


def test_scaffold_refuses_stacked_ranks() -> None:

    raw = {
        "federation_id": "sc-stack",
        "model": {"name_or_path": "tiny-llama"},
        "silos": [{"name": "a", "train_path": "a.jsonl"}, {"name": "b", "train_path": "b.jsonl"}],
        "aggregation": {"algorithm": "scaffold", "lora_merge": "stack"},
    }
    with pytest.raises(ConfigError, match="lora_merge 'stack' starts every round from a fresh LoRA"):
        parse_config(raw)
