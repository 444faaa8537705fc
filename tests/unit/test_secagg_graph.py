"""Secure aggregation on a sparse masking graph (Bell et al., CCS 2020): the graph, exact sums, dropouts,
O(k) work per silo, and the local unmask rule."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from silotune.crypto import secagg as sa
from silotune.crypto.secagg import SecAggError

PARAMS = sa.SecAggParams()
ROUND = "fed-graph/0"
N = 40


def _names(n: int) -> list[str]:
    return [f"s{i:03d}" for i in range(n)]


def _connected(graph: sa.MaskingGraph, removed: set[str]) -> bool:
    left = [u for u in graph.roster if u not in removed]
    seen, todo = {left[0]}, [left[0]]
    while todo:
        for v in graph.neighbours[todo.pop()]:
            if v not in removed and v not in seen:
                seen.add(v)
                todo.append(v)
    return len(seen) == len(left)


def test_degree_rule_and_complete_graph_for_small_rosters() -> None:
    assert [sa.harary_degree(n) for n in (40, 100, 128, 1000)] == [16, 20, 22, 30]
    small = sa.masking_graph(_names(32), ROUND)
    assert small.kind == "complete" and small.degree == 31
    assert all(len(v) == 31 for v in small.neighbours.values())
    assert small.threshold(PARAMS) == PARAMS.threshold(32)  # the roster-wide threshold, as before
    assert sa.masking_graph(_names(33), ROUND).kind == "harary"
    assert sa.masking_graph(_names(40), ROUND, complete_up_to=40).kind == "complete"  # configurable
    with pytest.raises(SecAggError, match="complete_up_to"):
        sa.masking_graph(_names(40), ROUND, complete_up_to=1)


@pytest.mark.parametrize("n", [33, 40, 128])
def test_sparse_graph_is_k_regular_symmetric_connected_and_recomputable(n: int) -> None:
    names = _names(n)
    g = sa.masking_graph(names, ROUND)
    k = g.degree
    assert g.kind == "harary" and k == sa.harary_degree(n) and k % 2 == 0
    for u, nb in g.neighbours.items():
        assert len(set(nb)) == k and u not in nb, f"{u} has {len(set(nb))} neighbours, expected {k}"
        assert all(u in g.neighbours[v] for v in nb), f"{u}'s edges are not symmetric"
    # k-connected (Harary): removing any k - 1 silos leaves the rest connected; sampled, plus the worst
    # case for a ring, a whole side of one silo's neighbourhood and more
    rng = random.Random(n)
    ring_side = set(sorted(g.neighbours[names[0]])[: k - 1])
    for removed in [ring_side, *(set(rng.sample(names, k - 1)) for _ in range(20))]:
        assert _connected(g, removed)
    # the same graph from the same roster in any order; another round or roster, another graph
    again = sa.masking_graph(list(reversed(names)), ROUND)
    assert again == g and again.to_bytes() == g.to_bytes() and again.digest == g.digest
    assert sa.masking_graph(names, "fed-graph/1").neighbours != g.neighbours
    assert sa.masking_graph([*names[1:], "zzz"], ROUND).seed != g.seed
    g.check_told(g.to_bytes(), names[0])


def test_a_silo_refuses_a_graph_that_the_seed_does_not_fix() -> None:
    names = _names(N)
    g = sa.masking_graph(names, ROUND)
    other = sa.masking_graph(names, "fed-graph/9")  # a valid-looking graph, from another seed
    with pytest.raises(SecAggError, match="masking graph it is told"):
        g.check_told(other.to_bytes(), names[0])
    with pytest.raises(SecAggError, match="not the one the round's roster fixes"):
        g.check_told(b"{}", names[0])


class SparseRound:
    """One round in memory, the coordinator routing each share message to its addressee only."""

    def __init__(self, n: int) -> None:
        self.names = _names(n)
        self.params = sa.SecAggParams(max_silos=max(64, n))
        self.clients = {
            m: sa.SecAggClient(m, round_id=ROUND, roster=self.names, params=self.params) for m in self.names
        }
        self.graph = self.clients[self.names[0]].graph
        self.adverts = {m: c.advertise() for m, c in self.clients.items()}
        self.shares = {
            m: c.share_keys({p: self.adverts[p] for p in self.graph.holders(m)})
            for m, c in self.clients.items()
        }
        self.inbox = {
            m: {s: self.shares[s][m] for s in self.names if m in self.shares[s]} for m in self.names
        }

    def masked(self, deltas: dict[str, dict[str, torch.Tensor]], alive: list[str]) -> dict[str, bytes]:
        w = 1 / len(self.names)
        return {m: self.clients[m].mask_update(deltas[m], self.inbox[m], weight=w) for m in alive}

    def unmask_sum(self, masked: dict[str, bytes], responders: list[str]) -> sa.SecAggResult:
        alive = sorted(masked)
        responses = {m: self.clients[m].unmask(alive) for m in responders}
        return sa.unmask_sum(
            masked, responses, adverts=self.adverts, round_id=ROUND, roster=self.names, params=self.params
        )


def _deltas(names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return {
        m: {"b": torch.randn(4, 6, generator=g) * 0.01, "a": torch.randn(7, generator=g) * 0.01}
        for m in names
    }


def _encoded_sum(deltas: dict[str, dict[str, torch.Tensor]], alive: list[str], n: int, params) -> np.ndarray:
    return sum(sa.encode_update(deltas[m], weight=1 / n, params=params).values for m in alive)


def test_forty_silos_on_the_sparse_graph_sum_exactly_like_plaintext() -> None:
    rnd = SparseRound(N)
    assert rnd.graph.kind == "harary" and rnd.graph.degree == 16
    assert all(len(s) == 16 for s in rnd.shares.values()), "a silo sent shares beyond its k neighbours"
    deltas = _deltas(rnd.names)
    out = rnd.unmask_sum(rnd.masked(deltas, rnd.names), rnd.names)
    assert out.dropped == () and out.silos == tuple(rnd.names)
    # exact: the unmasked integers are the sum of the plaintext encodings, bit for bit
    np.testing.assert_array_equal(out.encoded_sum.values, _encoded_sum(deltas, rnd.names, N, rnd.params))
    ref = sum(deltas[m]["b"].double() for m in rnd.names) / N
    assert float((out.delta["b"].double() - ref).abs().max()) < N * 2.0**-rnd.params.frac_bits


def test_dropouts_on_the_sparse_graph_still_recover_the_sum() -> None:
    rnd = SparseRound(N)
    deltas = _deltas(rnd.names)
    first = rnd.names[0]
    near = sorted(rnd.graph.neighbours[first])
    dropped = {near[0], near[1], rnd.names[-1]}  # two neighbours of one silo, and one elsewhere
    alive = [m for m in rnd.names if m not in dropped]
    responders = alive[:-2]  # two survivors also miss the unmask step: the other holders suffice
    out = rnd.unmask_sum(rnd.masked(deltas, alive), responders)
    assert set(out.dropped) == dropped
    np.testing.assert_array_equal(out.encoded_sum.values, _encoded_sum(deltas, alive, N, rnd.params))


def test_mask_work_per_silo_is_linear_in_k_not_n(monkeypatch: pytest.MonkeyPatch) -> None:
    """Count the pairs: key agreements and PRG streams in ``mask_update``, share messages, answer size."""
    rnd = SparseRound(N)
    k = rnd.graph.degree
    pairs: Counter[str] = Counter()
    streams: Counter[str] = Counter()
    real_pair, real_prg = sa._pairwise_key, sa._prg
    current: list[str] = []

    def count_pair(private, peer_public, round_id, u, v):  # type: ignore[no-untyped-def]
        pairs[current[0]] += 1
        return real_pair(private, peer_public, round_id, u, v)

    def count_prg(key, n):  # type: ignore[no-untyped-def]
        streams[current[0]] += 1
        return real_prg(key, n)

    monkeypatch.setattr(sa, "_pairwise_key", count_pair)
    monkeypatch.setattr(sa, "_prg", count_prg)
    deltas = _deltas(rnd.names)
    for m in rnd.names:
        current[:] = [m]
        rnd.clients[m].mask_update(deltas[m], rnd.inbox[m], weight=1 / N)
    assert set(pairs.values()) == {k}, f"pairwise masks per silo: {sorted(set(pairs.values()))}, k={k}"
    assert set(streams.values()) == {k + 1}  # k pairwise masks and the self mask
    assert all(len(s) == k for s in rnd.shares.values())
    answer = rnd.clients[rnd.names[0]].unmask(rnd.names)
    assert answer.count(b'"0x') == k + 1  # one share per holder, not one per silo


def test_a_silo_refuses_shares_from_outside_its_neighbourhood() -> None:
    rnd = SparseRound(N)
    u = rnd.names[0]
    far = next(m for m in rnd.names if m != u and m not in rnd.graph.neighbours[u])
    # the far silo's share message for someone else, filed as if it were for u
    blob = next(iter(rnd.shares[far].values()))
    with pytest.raises(SecAggError, match="not its neighbour"):
        rnd.clients[u].mask_update(_deltas([u])[u], {**rnd.inbox[u], far: blob}, weight=1 / N)


def test_a_silo_whose_neighbourhood_is_declared_dropped_does_not_answer() -> None:
    """Isolating ``v`` means declaring its neighbours dropped (their keys cut its masks off): ``v``
    then sees fewer than t_k of its holders survive and refuses to reveal anything."""
    rnd = SparseRound(128)  # at 40 silos, 16 dropped already break the roster-wide rule (t = 27)
    deltas = _deltas(rnd.names)
    rnd.masked(deltas, rnd.names)
    v = rnd.names[5]
    survivors = [m for m in rnd.names if m not in rnd.graph.neighbours[v]]
    assert len(survivors) >= PARAMS.threshold(128)  # the roster-wide rule alone would let it through
    with pytest.raises(SecAggError, match="holders survive"):
        rnd.clients[v].unmask(survivors)


def test_isolating_one_silo_needs_more_key_shares_than_its_surroundings_can_reveal() -> None:
    """The count in the module docstring (point 3) on the graphs silotune builds, with no colluder:
    every neighbour's key needs t_k shares; a silo reveals at most (k + 1 - t_k) key shares, each of a
    neighbour of its own."""
    for n, needed, most in [(40, 192, 145), (128, 352, 273)]:
        g = sa.masking_graph(_names(n), ROUND)
        k, t = g.degree, g.threshold(PARAMS)
        assert k * t == needed
        worst = 0
        for v in g.roster:
            nv = set(g.neighbours[v])
            worst = max(worst, sum(min(k + 1 - t, len(set(g.neighbours[x]) & nv)) for x in g.roster))
        assert worst == most < needed


def test_coordinator_refuses_masked_updates_that_do_not_fit_the_graph() -> None:
    rnd = SparseRound(N)
    deltas = _deltas(rnd.names)
    masked = rnd.masked(deltas, rnd.names)
    responses = {m: rnd.clients[m].unmask(rnd.names) for m in rnd.names}
    # the coordinator's side with another graph than the silos used: their partners do not fit it
    with pytest.raises(SecAggError, match="holders"):
        sa.unmask_sum(
            masked,
            responses,
            adverts=rnd.adverts,
            round_id=ROUND,
            roster=rnd.names,
            params=rnd.params,
            complete_up_to=2**20,
        )


def test_state_round_trip_keeps_the_graph() -> None:
    c = sa.SecAggClient("s001", round_id=ROUND, roster=_names(N))
    again = sa.SecAggClient.from_state(c.state_bytes())
    assert again.graph == c.graph and again.threshold == c.threshold
    assert again.neighbours == c.neighbours and len(c.neighbours) == 16


def _config(n: int, **security: object):  # type: ignore[no-untyped-def]
    from silotune.config import parse_config

    return parse_config(
        {
            "federation_id": "many",
            "model": {"name_or_path": "tiny-llama"},
            "silos": [{"name": f"s{i:03d}", "train_path": "x.jsonl"} for i in range(n)],
            "security": {"protection": "secagg", **security},
            "tracking": {"kind": "none"},
        }
    )


def test_config_chooses_the_graph_and_the_manifest_records_it() -> None:
    from silotune.protection.secagg import graph_of
    from silotune.records import RoundSummary

    default, explicit, wide = (
        _config(N),
        _config(N, secagg_complete_up_to=32),
        _config(N, secagg_complete_up_to=64),
    )
    assert default.fingerprint() == explicit.fingerprint() != wide.fingerprint()  # old configs keep theirs
    assert graph_of(default, 0).kind == "harary" and graph_of(wide, 0).kind == "complete"
    assert graph_of(default, 0) == sa.masking_graph(_names(N), "many/0")
    record = graph_of(default, 0).record()
    assert record == {
        "kind": "harary",
        "degree": 16,
        "seed": graph_of(default, 0).seed,
        "complete_up_to": 32,
        "digest": graph_of(default, 0).digest,
    }
    base = {
        "round": 1,
        "included": [],
        "excluded": {},
        "train": {},
        "delta_norm": None,
        "protection": "secagg",
        "privacy": {},
        "bytes": {},
    }
    assert RoundSummary(**base, masking=record).manifest_fields()["masking"] == record
    assert "masking" not in RoundSummary(**base).manifest_fields()  # other schemes' manifests unchanged


def test_a_sparse_round_through_the_store_reads_and_sends_only_neighbours_messages(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The protection layer (``silotune.protection.secagg``) on 40 silos: the announced graph is the
    silos' own, each silo reads the adverts and shares of its holders only and writes k share messages,
    and the survivors' answers unmask the sum of the masked uploads (one silo dropped)."""
    from silotune.config import parse_config
    from silotune.federation import open_round
    from silotune.protection import SCHEMES, SiloContext, run_silo_step
    from silotune.protection.secagg import adverts, graph_of, params_of, round_id
    from silotune.store import FederationLayout, LocalStore

    cfg = parse_config(
        {
            "federation_id": "sparse",
            "model": {"name_or_path": "tiny-llama"},
            "silos": [
                {"name": m, "train_path": "x.jsonl", "private_dir": str(tmp_path / "silos" / m)}
                for m in _names(N)
            ],
            "security": {"protection": "secagg"},
            "store": {"root": str(tmp_path / "store")},
            "tracking": {"kind": "none"},
        }
    )
    layout = FederationLayout(cfg.federation_id)
    reads: list[str] = []

    class CountingStore(LocalStore):
        def get_bounded(self, key: str, max_bytes: int) -> bytes:
            reads.append(key)
            return super().get_bounded(key, max_bytes)

    store = CountingStore(cfg.store.root)
    graph = graph_of(cfg, 0)
    assert graph.kind == "harary" and open_round(cfg, store, 0) == [layout.masking_graph(0)]
    for m in graph.roster:
        run_silo_step(cfg, m, 0, "secagg-advertise", store)
    written = {}
    for m in graph.roster:
        reads.clear()
        written[m] = run_silo_step(cfg, m, 0, "secagg-share", store)["keys"]
        read_from = {k.split("/")[1] for k in reads if k.startswith("messages/")}
        assert read_from == set(graph.holders(m)), f"{m} read adverts of {sorted(read_from)}"
    assert all(len(keys) == graph.degree for keys in written.values())
    scheme = SCHEMES["secagg"]
    deltas = _deltas(graph.roster)
    alive = [m for m in graph.roster if m != "s013"]  # s013 shared its keys, then dropped
    masked = {m: scheme.pack(SiloContext(cfg, m, 0, store), deltas[m]) for m in alive}
    assert scheme.close_upload(cfg, store, 0, masked) == alive
    responses = {}
    for m in alive:
        run_silo_step(cfg, m, 0, "secagg-unmask", store)
        responses[m] = store.get(layout.message(0, m, "secagg/unmask"))
    out = sa.unmask_sum(
        masked,
        responses,
        adverts=adverts(cfg, store, 0),
        round_id=round_id(cfg, 0),
        params=params_of(cfg),
        roster=list(graph.roster),
    )
    assert out.dropped == ("s013",)
    np.testing.assert_array_equal(out.encoded_sum.values, _encoded_sum(deltas, alive, N, params_of(cfg)))
