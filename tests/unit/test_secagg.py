"""Secure aggregation by pairwise masking: exact sums, dropouts, and refusing what would leak."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from silotune.crypto import secagg as sa
from silotune.crypto.secagg import SecAggError

PARAMS = sa.SecAggParams()
ROUND = "federation-x/round-3"


def _delta(seed: int, n: int = 600) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "q.lora_A": torch.randn(n // 2, generator=g).reshape(-1, 4) * 1e-3,
        "q.lora_B": torch.randn(n - n // 2, generator=g) * 1e-3,
    }


class Round:
    """Drives one round in memory, the way the coordinator would route messages."""

    def __init__(self, names: list[str], *, round_id: str = ROUND, checkpoint: bool = False) -> None:
        self.names = names
        self.round_id = round_id
        self.clients = {n: sa.SecAggClient(n, round_id=round_id) for n in names}
        self.adverts = {n: c.advertise() for n, c in self.clients.items()}
        shares = {n: c.share_keys(self.adverts) for n, c in self.clients.items()}
        self.inbox = {n: {s: shares[s][n] for s in names if s != n} for n in names}
        if checkpoint:  # each phase in a fresh process
            self.clients = {n: sa.SecAggClient.from_state(c.state_bytes()) for n, c in self.clients.items()}

    def mask(self, deltas: dict[str, dict[str, torch.Tensor]], weights: dict[str, float]) -> dict[str, bytes]:
        return {n: self.clients[n].mask_update(deltas[n], self.inbox[n], weight=weights[n]) for n in deltas}

    def unmask(self, masked: dict[str, bytes], responders: list[str] | None = None) -> sa.SecAggResult:
        alive = sorted(masked)
        responses = {n: self.clients[n].unmask(alive) for n in (responders or alive)}
        return sa.unmask_sum(masked, responses, adverts=self.adverts, round_id=self.round_id)


def test_params_and_thresholds() -> None:
    assert PARAMS.frac_bits == 27  # value_bound 2^-3, 64 silos: 2^6 * 2^-3 * 2^27 = 2^30 < 2^31
    assert PARAMS.max_silos * (PARAMS.value_bound * 2**PARAMS.frac_bits + 0.5) < 2**31
    assert [PARAMS.threshold(n) for n in (2, 3, 4, 6, 9, 10)] == [2, 2, 3, 4, 6, 7]
    for n in range(2, 65):
        assert PARAMS.threshold(n) > n / 2  # never both shares of one silo from honest silos
    with pytest.raises(ValueError, match=r"max_dropout_fraction=0\.5"):
        sa.SecAggParams(max_dropout_fraction=0.5)
    with pytest.raises(ValueError, match="leaves no fractional bits"):
        sa.SecAggParams(value_bound=1e9)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=7),
    data=st.data(),
    seed=st.integers(min_value=0, max_value=2**16),
    checkpoint=st.booleans(),
)
def test_masked_sum_is_exact_with_up_to_a_third_dropped(n, data, seed, checkpoint) -> None:
    names = [f"silo-{i:02d}" for i in range(n)]
    dropped = data.draw(st.sets(st.sampled_from(names), max_size=n // 3), label="dropped")
    raw = data.draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n), label="examples")
    weights = {name: r / sum(raw) for name, r in zip(names, raw, strict=True)}
    deltas = {name: _delta(seed + i) for i, name in enumerate(names)}
    rnd = Round(names, checkpoint=checkpoint)
    masked = rnd.mask({k: v for k, v in deltas.items() if k not in dropped}, weights)
    result = rnd.unmask(masked)
    alive = sorted(set(names) - dropped)
    assert result.silos == tuple(alive) and result.dropped == tuple(sorted(dropped))
    # integer-exact on the encodings
    expected = sum(sa.encode_update(deltas[s], weight=weights[s]).values for s in alive)
    assert np.array_equal(result.encoded_sum.values, expected)
    # and the decoded floats are the plaintext weighted sum up to the fixed-point step
    for key in deltas[names[0]]:
        plain = sum(weights[s] * deltas[s][key].double() for s in alive)
        err = float((result.delta[key].double() - plain).abs().max())
        assert err <= len(alive) * 2.0 ** -(PARAMS.frac_bits + 1) + 1e-2 * 2.0**-23
        assert result.delta[key].shape == deltas[names[0]][key].shape
    assert abs(result.weight - sum(weights[s] for s in alive)) < 1e-12


def test_single_masked_update_reveals_nothing_obvious() -> None:
    names = ["a", "b", "c"]
    rnd = Round(names)
    delta = {"w": torch.linspace(-0.01, 0.01, 4000)}
    blob = rnd.clients["a"].mask_update(delta, rnd.inbox["a"], weight=1.0)
    masked = sa.MaskedUpdate.parse(blob).values
    plain = sa.encode_update(delta).values.astype(np.uint32)
    assert np.mean(masked == plain) < 0.01
    signed_plain = plain.view(np.int32).astype(np.float64)
    signed_masked = masked.view(np.int32).astype(np.float64)
    assert abs(np.corrcoef(signed_plain, signed_masked)[0, 1]) < 0.1
    # the encodings are small numbers; masked values spread over the whole ring
    assert np.abs(signed_plain).max() < 2**22
    assert np.mean(np.abs(signed_masked) > 2**29) > 0.6
    assert abs(masked.astype(np.float64).mean() / 2**32 - 0.5) < 0.05


def test_masked_bytes_are_within_ten_percent_of_fp32() -> None:
    rnd = Round(["a", "b", "c"])
    delta = {"w": torch.randn(4096) * 1e-3}
    blob = rnd.clients["a"].mask_update(delta, rnd.inbox["a"], weight=1.0)
    assert len(blob) <= 1.1 * 4096 * 4


def test_pairwise_masks_cancel() -> None:
    rnd = Round(["a", "b"])
    a, b = rnd.clients["a"], rnd.clients["b"]
    k_ab = sa._pairwise_key(a._mask, sa.Advert.parse(rnd.adverts["b"]).mask_key, ROUND, "a", "b")
    k_ba = sa._pairwise_key(b._mask, sa.Advert.parse(rnd.adverts["a"]).mask_key, ROUND, "b", "a")
    assert k_ab == k_ba
    zero = {"w": torch.zeros(100)}
    masked = rnd.mask({"a": zero, "b": zero}, {"a": 0.5, "b": 0.5})
    ya = sa.MaskedUpdate.parse(masked["a"]).values
    yb = sa.MaskedUpdate.parse(masked["b"]).values
    self_a = sa._prg(sa._self_mask_key(a._seed, ROUND, "a"), 100)
    self_b = sa._prg(sa._self_mask_key(b._seed, ROUND, "b"), 100)
    assert np.array_equal(ya - self_a, -(yb - self_b))  # mask_ab = -mask_ba (mod 2^32)


def test_too_many_dropouts_are_refused() -> None:
    names = ["a", "b", "c", "d", "e", "f"]  # threshold 4: two may drop
    rnd = Round(names)
    masked = rnd.mask({n: _delta(i) for i, n in enumerate(names[:3])}, dict.fromkeys(names, 0.1))
    with pytest.raises(SecAggError, match="below the threshold 4"):
        rnd.clients["a"].unmask(sorted(masked))
    with pytest.raises(SecAggError, match="below the threshold 4"):
        sa.unmask_sum(masked, {}, adverts=rnd.adverts, round_id=ROUND)


def test_too_few_responses_are_refused() -> None:
    names = ["a", "b", "c"]
    rnd = Round(names)
    masked = rnd.mask({n: _delta(i) for i, n in enumerate(names)}, dict.fromkeys(names, 0.3))
    with pytest.raises(SecAggError, match=r"shares of silo .* need 2"):
        rnd.unmask(masked, responders=["a"])


def test_client_refuses_what_could_leak() -> None:
    names = ["a", "b", "c"]
    rnd = Round(names)
    a = rnd.clients["a"]
    with pytest.raises(SecAggError, match="unmask before mask_update"):
        a.unmask(names)
    a.mask_update(_delta(0), rnd.inbox["a"], weight=0.5)
    with pytest.raises(SecAggError, match="out of order or twice"):
        a.mask_update(_delta(0), rnd.inbox["a"], weight=0.5)
    with pytest.raises(SecAggError, match="not among the survivors"):
        a.unmask(["b", "c"])
    with pytest.raises(SecAggError, match="never shared keys"):
        a.unmask(["a", "b", "zed"])
    a.unmask(["a", "b"])
    with pytest.raises(SecAggError, match="out of order or twice"):  # would reveal c's other share
        a.unmask(["a", "b", "c"])


def test_inconsistent_survivor_views_are_rejected() -> None:
    names = ["a", "b", "c", "d"]
    rnd = Round(names)
    masked = rnd.mask({n: _delta(i) for i, n in enumerate(names[:3])}, dict.fromkeys(names, 0.25))
    responses = {n: rnd.clients[n].unmask(["a", "b", "c"]) for n in ("a", "b")}
    responses["c"] = rnd.clients["c"].unmask(["c", "a", "b"])
    sa.unmask_sum(masked, responses, adverts=rnd.adverts, round_id=ROUND)  # same set, any order
    rnd2 = Round(names)
    masked2 = rnd2.mask({n: _delta(i) for i, n in enumerate(names)}, dict.fromkeys(names, 0.25))
    liar = {n: rnd2.clients[n].unmask(["a", "b", "c"]) for n in ("a", "b", "c")}
    with pytest.raises(SecAggError, match="unmasked for survivors"):
        sa.unmask_sum(masked2, liar, adverts=rnd2.adverts, round_id=ROUND)


def test_bad_shares_are_detected_not_silently_wrong() -> None:
    names = ["a", "b", "c"]
    rnd = Round(names)
    masked = rnd.mask({n: _delta(i) for i, n in enumerate(names)}, dict.fromkeys(names, 0.3))
    responses = {n: rnd.clients[n].unmask(names) for n in ("a", "b")}
    doc = json.loads(responses["b"])
    doc["seed_shares"]["a"] = hex(int(doc["seed_shares"]["a"], 16) ^ 1)
    responses["b"] = json.dumps(doc).encode()
    with pytest.raises(SecAggError, match="does not match its commitment"):
        sa.unmask_sum(masked, responses, adverts=rnd.adverts, round_id=ROUND)


def test_dropped_silo_with_bad_key_shares_is_detected() -> None:
    names = ["a", "b", "c"]
    rnd = Round(names)
    masked = rnd.mask({n: _delta(i) for i, n in enumerate(names[:2])}, dict.fromkeys(names, 0.3))
    responses = {n: rnd.clients[n].unmask(["a", "b"]) for n in ("a", "b")}
    doc = json.loads(responses["a"])
    doc["key_shares"]["c"] = hex(int(doc["key_shares"]["c"], 16) + 1)
    responses["a"] = json.dumps(doc).encode()
    with pytest.raises(SecAggError, match="rebuilt mask key does not match"):
        sa.unmask_sum(masked, responses, adverts=rnd.adverts, round_id=ROUND)


def test_tampered_messages_are_rejected() -> None:
    names = ["a", "b", "c"]
    rnd = Round(names)
    # a share message replayed to another silo, or altered, does not open
    wrong = dict(rnd.inbox["a"])
    wrong["b"] = rnd.inbox["c"]["b"]
    with pytest.raises(SecAggError, match="not from it, to 'a'"):
        rnd.clients["a"].mask_update(_delta(0), wrong, weight=0.5)
    doc = json.loads(rnd.inbox["a"]["b"])
    doc["ct"] = doc["ct"][:-2] + ("00" if doc["ct"][-2:] != "00" else "11")
    with pytest.raises(SecAggError, match="does not decrypt"):
        rnd.clients["a"].mask_update(_delta(0), {**rnd.inbox["a"], "b": json.dumps(doc).encode()}, weight=0.5)
    masked = rnd.mask({n: _delta(i) for i, n in enumerate(names)}, dict.fromkeys(names, 0.3))
    responses = {n: rnd.clients[n].unmask(names) for n in names}
    for bad in (masked["b"][:-1], masked["b"][:-4], masked["b"][:20], b"junk"):
        with pytest.raises(SecAggError):
            sa.unmask_sum({**masked, "b": bad}, responses, adverts=rnd.adverts, round_id=ROUND)
    flipped = bytearray(masked["b"])
    flipped[-1] ^= 1
    with pytest.raises(SecAggError, match="truncated or corrupted"):
        sa.unmask_sum({**masked, "b": bytes(flipped)}, responses, adverts=rnd.adverts, round_id=ROUND)
    with pytest.raises(SecAggError, match="filed under 'c' is from 'b'"):
        sa.unmask_sum({**masked, "c": masked["b"]}, responses, adverts=rnd.adverts, round_id=ROUND)
    with pytest.raises(SecAggError, match="for round"):
        sa.unmask_sum(masked, responses, adverts=rnd.adverts, round_id="another-round")


def test_roster_checks() -> None:
    a = sa.SecAggClient("a", round_id=ROUND)
    b = sa.SecAggClient("b", round_id=ROUND)
    other = sa.SecAggClient("c", round_id="old-round")
    with pytest.raises(SecAggError, match="needs 2"):
        a.share_keys([a.advertise()])
    with pytest.raises(SecAggError, match="for round 'old-round'"):
        a.share_keys([a.advertise(), other.advertise()])
    with pytest.raises(SecAggError, match="own advert"):
        a.share_keys([sa.SecAggClient("a", round_id=ROUND).advertise(), b.advertise()])
    with pytest.raises(SecAggError, match="two adverts"):
        a.share_keys([a.advertise(), b.advertise(), b.advertise()])


@pytest.mark.parametrize(
    ("delta", "weight", "message"),
    [
        ({}, 1.0, "nothing to mask"),
        ({"a": torch.zeros(0)}, 1.0, "every tensor is empty"),
        ({"a": torch.tensor([float("inf")])}, 1.0, "non-finite"),
        ({"a": torch.tensor([1, 2])}, 1.0, "floating-point"),
        ({"a": torch.tensor([0.2])}, 1.0, "exceeds value_bound"),
        ({"a": torch.tensor([1e-3])}, 0.0, "weight"),
        ({"a": torch.tensor([1e-3])}, 2.0, "weight"),
    ],
)
def test_mask_refuses_bad_input(delta, weight, message) -> None:
    rnd = Round(["a", "b"])
    with pytest.raises(SecAggError, match=message):
        rnd.clients["a"].mask_update(delta, rnd.inbox["a"], weight=weight)
    # a refused update leaves the client able to retry with a good one
    rnd.clients["a"].mask_update(_delta(0), rnd.inbox["a"], weight=0.5)


def test_header_framing_is_checked() -> None:
    rnd = Round(["a", "b"])
    blob = rnd.clients["a"].mask_update(_delta(0), rnd.inbox["a"], weight=0.5)
    (n,) = struct.unpack_from(">I", blob, 8)
    bad = blob[:8] + struct.pack(">I", n + 10**6) + blob[12:]
    with pytest.raises(SecAggError, match="truncated header"):
        sa.MaskedUpdate.parse(bad)
