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

    def __init__(
        self,
        names: list[str],
        *,
        round_id: str = ROUND,
        checkpoint: bool = False,
        roster: list[str] | None = None,
    ) -> None:
        self.names = names
        self.round_id = round_id
        self.roster = list(roster or names)
        self.clients = {n: sa.SecAggClient(n, round_id=round_id, roster=self.roster) for n in names}
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
        return self.sum(masked, responses)

    def sum(self, masked: dict[str, bytes], responses: dict[str, bytes], **kw: object) -> sa.SecAggResult:
        kw = {"adverts": self.adverts, "round_id": self.round_id, "roster": self.roster, **kw}
        return sa.unmask_sum(masked, responses, **kw)


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


def test_exact_sum_when_roster_silos_never_advertise_or_drop() -> None:
    """Shamir x-coordinates come from the pinned roster, not from who advertised."""
    roster = [f"silo-{c}" for c in "abcdefghi"]  # 9 silos: t = 6
    absent, dropped = "silo-c", "silo-f"  # c never advertises, f shares keys and then drops
    names = [n for n in roster if n != absent]
    rnd = Round(names, roster=roster, checkpoint=True)
    deltas = {n: _delta(i) for i, n in enumerate(names)}
    weights = dict.fromkeys(names, 0.1)
    masked = rnd.mask({n: d for n, d in deltas.items() if n != dropped}, weights)
    result = rnd.unmask(masked)
    alive = [n for n in names if n != dropped]
    assert result.silos == tuple(alive) and result.dropped == (dropped,)
    expected = sum(sa.encode_update(deltas[n], weight=0.1).values for n in alive)
    assert np.array_equal(result.encoded_sum.values, expected)


def test_state_round_trips_at_every_phase() -> None:
    names = ["a", "b", "c"]
    clients = {n: sa.SecAggClient(n, round_id=ROUND, roster=[*names, "d"]) for n in names}

    def same(c: sa.SecAggClient) -> sa.SecAggClient:
        again = sa.SecAggClient.from_state(c.state_bytes())
        assert again.state_bytes() == c.state_bytes() and again.roster == ("a", "b", "c", "d")
        return again

    clients = {n: same(c) for n, c in clients.items()}
    adverts = {n: c.advertise() for n, c in clients.items()}
    shares = {n: c.share_keys(adverts) for n, c in clients.items()}
    clients = {n: same(c) for n, c in clients.items()}
    for n, c in clients.items():
        c.mask_update(_delta(0), {s: shares[s][n] for s in names if s != n}, weight=0.5)
    clients = {n: same(c) for n, c in clients.items()}
    assert clients["a"].answered is None
    answer = clients["a"].unmask(names)
    restored = same(clients["a"])
    assert restored.answered == ("a", "b", "c") and restored.unmask(names) == answer
    with pytest.raises(SecAggError, match="unreadable client state"):
        sa.SecAggClient.from_state(clients["b"].state_bytes().replace(b'"answered":null', b'"answered":7'))


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
        rnd.sum(masked, {})


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
    with pytest.raises(SecAggError, match=r"already answered survivor set \['a', 'b'\]"):  # c's other share
        a.unmask(["a", "b", "c"])


def test_inconsistent_survivor_views_are_rejected() -> None:
    names = ["a", "b", "c", "d"]
    rnd = Round(names)
    masked = rnd.mask({n: _delta(i) for i, n in enumerate(names[:3])}, dict.fromkeys(names, 0.25))
    responses = {n: rnd.clients[n].unmask(["a", "b", "c"]) for n in ("a", "b")}
    responses["c"] = rnd.clients["c"].unmask(["c", "a", "b"])
    rnd.sum(masked, responses)  # same set, any order
    rnd2 = Round(names)
    masked2 = rnd2.mask({n: _delta(i) for i, n in enumerate(names)}, dict.fromkeys(names, 0.25))
    liar = {n: rnd2.clients[n].unmask(["a", "b", "c"]) for n in ("a", "b", "c")}
    with pytest.raises(SecAggError, match="unmasked for survivors"):
        rnd2.sum(masked2, liar)


def test_bad_shares_are_detected_not_silently_wrong() -> None:
    names = ["a", "b", "c"]
    rnd = Round(names)
    masked = rnd.mask({n: _delta(i) for i, n in enumerate(names)}, dict.fromkeys(names, 0.3))
    responses = {n: rnd.clients[n].unmask(names) for n in ("a", "b")}
    doc = json.loads(responses["b"])
    doc["seed_shares"]["a"] = hex(int(doc["seed_shares"]["a"], 16) ^ 1)
    responses["b"] = json.dumps(doc).encode()
    with pytest.raises(SecAggError, match="does not match its commitment"):
        rnd.sum(masked, responses)


def test_dropped_silo_with_bad_key_shares_is_detected() -> None:
    names = ["a", "b", "c"]
    rnd = Round(names)
    masked = rnd.mask({n: _delta(i) for i, n in enumerate(names[:2])}, dict.fromkeys(names, 0.3))
    responses = {n: rnd.clients[n].unmask(["a", "b"]) for n in ("a", "b")}
    doc = json.loads(responses["a"])
    doc["key_shares"]["c"] = hex(int(doc["key_shares"]["c"], 16) + 1)
    responses["a"] = json.dumps(doc).encode()
    with pytest.raises(SecAggError, match="rebuilt mask key does not match"):
        rnd.sum(masked, responses)


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
            rnd.sum({**masked, "b": bad}, responses)
    flipped = bytearray(masked["b"])
    flipped[-1] ^= 1
    with pytest.raises(SecAggError, match="truncated or corrupted"):
        rnd.sum({**masked, "b": bytes(flipped)}, responses)
    with pytest.raises(SecAggError, match="filed under 'c' is from 'b'"):
        rnd.sum({**masked, "c": masked["b"]}, responses)
    with pytest.raises(SecAggError, match="for round"):
        rnd.sum(masked, responses, round_id="another-round")


def test_roster_checks() -> None:
    roster = ["a", "b"]
    a = sa.SecAggClient("a", round_id=ROUND, roster=roster)
    b = sa.SecAggClient("b", round_id=ROUND, roster=roster)
    old = sa.SecAggClient("b", round_id="old-round", roster=roster)
    with pytest.raises(SecAggError, match=r"silo 'a': 1 advert\(s\), below the threshold 2"):
        a.share_keys({"a": a.advertise()})
    with pytest.raises(SecAggError, match="for round 'old-round'"):
        a.share_keys({"a": a.advertise(), "b": old.advertise()})
    with pytest.raises(SecAggError, match="own advert"):
        a.share_keys(
            {"a": sa.SecAggClient("a", round_id=ROUND, roster=roster).advertise(), "b": b.advertise()}
        )
    with pytest.raises(SecAggError, match="two adverts"):
        a.share_keys([a.advertise(), b.advertise(), b.advertise()])
    with pytest.raises(SecAggError, match="advert filed under 'b' is from 'a'"):
        a.share_keys({"a": a.advertise(), "b": a.advertise()})
    assert set(a.share_keys({"a": a.advertise(), "b": b.advertise()})) == {"b"}  # refusals left it usable


@pytest.mark.parametrize(
    ("silo", "roster", "message"),
    [
        ("a", ["b", "c"], "'a' is not in the roster"),
        ("a", ["a"], "needs 2"),
        ("a", ["a", "b", "b"], "duplicate"),
        ("a", ["a", ""], "non-empty strings"),
        ("a", "ab", "sequence of silo names"),
        ("a", [f"s{i}" for i in range(65)] + ["a"], "max_silos=64"),
    ],
)
def test_client_roster_is_validated(silo, roster, message) -> None:
    with pytest.raises(SecAggError, match=message):
        sa.SecAggClient(silo, round_id=ROUND, roster=roster)


# -- an actively malicious coordinator ---------------------------------------------------------


def test_injected_fake_silos_are_refused() -> None:
    """The coordinator adds silos it controls: enough of them would hold t shares of a's secrets."""
    roster = ["a", "b", "c"]
    a = sa.SecAggClient("a", round_id=ROUND, roster=roster)
    fakes = ["fake-1", "fake-2", "fake-3"]  # 4 adverts: t would be 3, all held by the coordinator
    forged = {f: sa.SecAggClient(f, round_id=ROUND, roster=["a", *fakes]) for f in fakes}
    adverts = {"a": a.advertise(), **{f: c.advertise() for f, c in forged.items()}}
    with pytest.raises(SecAggError, match=r"silo 'a': advert from 'fake-1', who is not in the roster"):
        a.share_keys(adverts)
    # one fake next to the real silos is refused as well, by name or in a plain list
    rnd = Round(roster)
    with pytest.raises(SecAggError, match="'fake-1', who is not in the roster"):
        a.share_keys({**rnd.adverts, "a": a.advertise(), "fake-1": forged["fake-1"].advertise()})
    with pytest.raises(SecAggError, match="'fake-2', who is not in the roster"):
        a.share_keys([a.advertise(), rnd.adverts["b"], forged["fake-2"].advertise()])
    # and a fake advert filed under a real silo's name
    with pytest.raises(SecAggError, match="advert filed under 'b' is from 'fake-1'"):
        a.share_keys({"a": a.advertise(), "b": forged["fake-1"].advertise(), "c": rnd.adverts["c"]})


def test_threshold_comes_from_the_roster_not_the_adverts() -> None:
    roster = ["a", "b", "c", "d", "e", "f"]  # t = 4
    clients = {n: sa.SecAggClient(n, round_id=ROUND, roster=roster) for n in ("a", "b", "c")}
    adverts = {n: c.advertise() for n, c in clients.items()}
    assert PARAMS.threshold(3) == 2 and PARAMS.threshold(6) == 4  # 3 adverts: enough for a roster of 3
    for name, client in clients.items():
        with pytest.raises(
            SecAggError, match=rf"silo '{name}': 3 advert\(s\), below the threshold 4 of a roster of 6"
        ):
            client.share_keys(adverts)
    # four of six is enough, and the sum is exact over them
    names = ["a", "b", "c", "d"]
    rnd = Round(names, roster=roster)
    deltas = {n: _delta(i) for i, n in enumerate(names)}
    result = rnd.unmask(rnd.mask(deltas, dict.fromkeys(names, 0.25)))
    expected = sum(sa.encode_update(deltas[n], weight=0.25).values for n in names)
    assert np.array_equal(result.encoded_sum.values, expected) and result.silos == tuple(names)


def test_shares_from_outside_the_round_are_refused() -> None:
    roster = ["a", "b", "c", "d"]
    rnd = Round(["a", "b", "c"], roster=roster)
    a = rnd.clients["a"]
    # d is in the roster but never advertised, so it cannot be in U1
    d = sa.SecAggClient("d", round_id=ROUND, roster=roster)
    from_d = d.share_keys({**rnd.adverts, "d": d.advertise()})["a"]
    with pytest.raises(SecAggError, match=r"silo 'a': share message from 'd', who did not advertise"):
        a.mask_update(_delta(0), {**rnd.inbox["a"], "d": from_d}, weight=0.5)
    with pytest.raises(SecAggError, match="'zed', who is not in the roster"):
        a.mask_update(_delta(0), {**rnd.inbox["a"], "zed": rnd.inbox["a"]["b"]}, weight=0.5)
    with pytest.raises(SecAggError, match=r"silo 'a': only 2 silos shared keys, below the threshold 3"):
        a.mask_update(_delta(0), {"b": rnd.inbox["a"]["b"]}, weight=0.5)
    a.mask_update(_delta(0), rnd.inbox["a"], weight=0.5)


def test_second_survivor_set_is_refused_and_the_first_answer_is_idempotent() -> None:
    """Asked for [a, b, c] a reveals d's mask-key share; asked again for [a, b, c, d] it would reveal
    d's self-mask seed share too: with t such answers the coordinator would unmask d alone."""
    names = ["a", "b", "c", "d"]
    rnd = Round(names)
    rnd.mask({n: _delta(i) for i, n in enumerate(names)}, dict.fromkeys(names, 0.25))
    a = rnd.clients["a"]
    first = a.unmask(["a", "b", "c"])
    assert set(json.loads(first)["key_shares"]) == {"d"}
    with pytest.raises(SecAggError, match=r"already answered survivor set \['a', 'b', 'c'\] for this round"):
        a.unmask(["a", "b", "c", "d"])
    assert a.unmask(["c", "b", "a"]) == first  # the same set again (any order): the same bytes
    # the answered set survives a checkpoint
    restored = sa.SecAggClient.from_state(a.state_bytes())
    assert restored.state_bytes() == a.state_bytes()
    assert restored.unmask(["a", "b", "c"]) == first
    with pytest.raises(SecAggError, match=r"already answered survivor set \['a', 'b', 'c'\]"):
        restored.unmask(["a", "b", "c", "d"])
    with pytest.raises(SecAggError, match="already answered"):
        sa.SecAggClient.from_state(a.state_bytes()).unmask(["a", "b", "d"])


def test_survivor_sets_outside_u1_or_below_the_threshold_are_refused() -> None:
    roster = ["a", "b", "c", "d", "e"]  # t = 4
    rnd = Round(["a", "b", "c", "d"], roster=roster)
    rnd.mask({n: _delta(i) for i, n in enumerate(rnd.names)}, dict.fromkeys(rnd.names, 0.25))
    a = rnd.clients["a"]
    with pytest.raises(SecAggError, match=r"survivors \['e'\] never shared keys with 'a'"):
        a.unmask(["a", "b", "c", "e"])  # e is in the roster but not in U1
    with pytest.raises(SecAggError, match="only 3 survivors, below the threshold 4"):
        a.unmask(["a", "b", "c"])
    with pytest.raises(SecAggError, match="duplicates"):
        a.unmask(["a", "b", "c", "c"])
    with pytest.raises(SecAggError, match="not among the survivors"):
        a.unmask(["b", "c", "d"])
    a.unmask(["a", "b", "c", "d"])  # refusals do not count as an answer


def test_unmask_sum_refuses_names_outside_the_roster() -> None:
    names = ["a", "b", "c"]
    rnd = Round(names)
    masked = rnd.mask({n: _delta(i) for i, n in enumerate(names)}, dict.fromkeys(names, 0.3))
    responses = {n: rnd.clients[n].unmask(names) for n in names}
    rnd.sum(masked, responses)  # the honest round goes through
    outsider = Round(["a", "zed"])  # a well-formed round of another roster
    zed_masked = outsider.mask({"zed": _delta(9)}, {"zed": 0.5})["zed"]
    zed_response = json.dumps({"v": 1, "silo": "zed", "round": ROUND, "survivors": names}).encode()
    with pytest.raises(SecAggError, match=r"unmask response from 'zed', which is not in the roster"):
        rnd.sum(masked, {**responses, "zed": zed_response})
    with pytest.raises(SecAggError, match=r"masked update from 'zed', which is not in the roster"):
        rnd.sum({**masked, "zed": zed_masked}, responses)
    with pytest.raises(SecAggError, match=r"advert from 'zed', who is not in the roster"):
        rnd.sum(masked, responses, adverts={**rnd.adverts, "zed": outsider.adverts["zed"]})
    # t comes from the roster: the same three silos inside a roster of six are too few
    with pytest.raises(SecAggError, match="below the threshold 4"):
        rnd.sum(masked, responses, roster=[*names, "d", "e", "f"])


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
