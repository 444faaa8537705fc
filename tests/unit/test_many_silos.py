"""Secure aggregation and CKKS at 128 silos: the encodings have the headroom, configs say what fits."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from silotune.config import parse_config
from silotune.crypto import ckks
from silotune.crypto import secagg as sa
from silotune.errors import ConfigError
from silotune.protection.secagg import params_of

N = 128


def _config(silos: int, **security: Any) -> Any:
    return parse_config(
        {
            "federation_id": "many",
            "model": {"name_or_path": "tiny-llama"},
            "silos": [{"name": f"s{i:03d}", "train_path": "x.jsonl"} for i in range(silos)],
            "security": security,
            "tracking": {"kind": "none"},
        }
    )


def _deltas(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"b": (torch.randn(3, 5, generator=g) * 0.02).clamp(-0.1, 0.1)} for _ in range(n)]


def test_secagg_sums_beyond_the_old_cap_of_64_with_a_dropout() -> None:
    """The encoding follows the federation's size (128 here); a real round beyond the old cap of 64
    (72 silos, on the sparse masking graph: each silo exchanges keys with its neighbours only)."""
    params = params_of(_config(N, protection="secagg"))
    assert params.max_silos == N and params.frac_bits >= 24
    n = 72
    params = params_of(_config(n, protection="secagg"))
    names = [f"s{i:03d}" for i in range(n)]
    clients = {m: sa.SecAggClient(m, round_id="r", roster=names, params=params) for m in names}
    adverts = {m: c.advertise() for m, c in clients.items()}
    shares = {m: c.share_keys(adverts) for m, c in clients.items()}
    deltas = dict(zip(names, _deltas(n), strict=True))
    alive = names[1:]  # s000 shared its keys, then dropped
    masked = {
        m: clients[m].mask_update(deltas[m], {s: shares[s][m] for s in names if m in shares[s]}, weight=1 / n)
        for m in alive
    }
    responses = {m: clients[m].unmask(alive) for m in alive}
    out = sa.unmask_sum(masked, responses, adverts=adverts, round_id="r", roster=names, params=params)
    ref = sum(deltas[m]["b"].double() for m in alive) / n
    assert out.dropped == ("s000",)
    assert float((out.delta["b"].double() - ref).abs().max()) < n * 2.0**-params.frac_bits


def test_ckks_preset_for_128_silos_sums_and_keeps_the_bytes() -> None:
    big = ckks.ckks_preset("packed-n4096-s128")
    default = ckks.ckks_preset(ckks.DEFAULT_PRESET)
    assert big.max_silos >= N and big.values_per_ciphertext == default.values_per_ciphertext
    secret = ckks.load_context(ckks.create_secret_context("packed-n4096-s128"))
    public = ckks.load_context(ckks.public_context(secret))
    deltas = _deltas(N)
    blobs = [ckks.encrypt_update(d, secret, weight=1 / N) for d in deltas]
    total = ckks.decrypt_update(ckks.sum_encrypted(blobs, public), secret)
    ref = sum(d["b"].double() for d in deltas) / N
    assert float((total["b"].double() - ref).abs().max()) < N * 2.0 ** -(big.frac_bits + 1) + 1e-12
    small = ckks.load_context(ckks.create_secret_context())  # the default preset stops at 32
    one = ckks.encrypt_update(deltas[0], small, weight=1 / N)
    with pytest.raises(ckks.EncryptionError, match="exceed max_silos=32"):
        ckks.sum_encrypted([one] * 33, ckks.load_context(ckks.public_context(small)))


def test_config_names_a_ckks_preset_that_fits() -> None:
    with pytest.raises(
        ConfigError, match=r"sums at most 32 updates, a round here sums up to 100.*packed-n4096-s128"
    ):
        _config(100, protection="ckks")
    assert _config(100, protection="ckks", ckks_preset="packed-n4096-s128").silos
    sampled = parse_config(
        {
            **_config(100).model_dump(mode="json"),
            "security": {"protection": "ckks"},
            "aggregation": {"silos_per_round": 32, "min_silos": 2},
        }
    )
    assert sampled.aggregation.round_size(100) == 32  # a round of 32 fits the default preset
