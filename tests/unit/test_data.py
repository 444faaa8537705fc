from __future__ import annotations

import json
from pathlib import Path

import pytest

from silotune.data import IGNORE_INDEX, collate, encode_chat, encode_dataset, load_dataset, read_records
from silotune.demo import make_demo_silos
from silotune.errors import DataError


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_jsonl_line_is_reported_with_its_number(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "d.jsonl", ['{"instruction": "a", "response": "b"}', "", '{"instruction": "c", "resp']
    )
    with pytest.raises(DataError, match=r"d\.jsonl:3: invalid JSON"):
        read_records(p)


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"instruction": "a"}', "field 'response'"),
        ('{"instruction": "", "response": "b"}', "field 'instruction'"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "robot"),
        ('{"text": "x"}', "needs 'messages' or 'instruction'"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_records(tmp_path: Path, line: str, needle: str) -> None:
    p = _write(tmp_path / "d.jsonl", ['{"instruction": "a", "response": "b"}', line])
    with pytest.raises(DataError) as err:
        read_records(p)
    assert ":2:" in str(err.value) and needle in str(err.value)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unsupported file type"):
        read_records(_write(tmp_path / "d.csv", ["a,b"]))
    with pytest.raises(DataError, match="empty"):
        read_records(_write(tmp_path / "e.jsonl", [""]))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read Parquet"):
        read_records(tmp_path / "bad.parquet")


def test_parquet_json_and_chat_formats(tmp_path: Path) -> None:
    import datasets

    rows = [{"instruction": "q1", "response": "a1"}, {"instruction": "q2", "response": "a2"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert read_records(tmp_path / "d.parquet")[1][-1] == {"role": "assistant", "content": "a2"}
    (tmp_path / "d.json").write_text(
        json.dumps(
            [
                {
                    "messages": [
                        {"role": "system", "content": "s"},
                        {"role": "user", "content": "u"},
                        {"role": "assistant", "content": "x"},
                    ]
                }
            ]
        )
    )
    assert [m["role"] for m in read_records(tmp_path / "d.json")[0]] == ["system", "user", "assistant"]
    ds = load_dataset(tmp_path / "d.parquet")
    assert len(ds) == 2 and "messages" in ds.column_names


def test_only_response_tokens_carry_loss(tokenizer) -> None:
    chat = [{"role": "user", "content": "Convert 3 km to m."}, {"role": "assistant", "content": "3000 m"}]
    ex = encode_chat(chat, tokenizer, max_len=256)
    assert ex is not None
    target = [t for t in ex.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(target) == "3000 m<|im_end|>"
    # The prompt (system + user turns) is masked and sits before the answer.
    first = next(i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX)
    assert "Convert 3 km" in tokenizer.decode(ex.input_ids[:first])
    assert all(t == IGNORE_INDEX for t in ex.labels[:first])


def test_multi_turn_and_truncation(tokenizer) -> None:
    chat = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "two"},
    ]
    ex = encode_chat(chat, tokenizer, max_len=512)
    assert ex is not None
    target = tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert target == "one<|im_end|>two<|im_end|>"
    assert encode_chat(chat[:2], tokenizer, max_len=5) is None  # the prompt alone fills 5 tokens
    with pytest.raises(DataError, match="max_seq_len=5"):
        encode_dataset([chat[:2]], tokenizer, max_len=5)


def test_collate_pads_without_loss(tokenizer) -> None:
    a = encode_chat(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenizer, 256
    )
    b = encode_chat(
        [{"role": "user", "content": "a longer question here"}, {"role": "assistant", "content": "ok"}],
        tokenizer,
        256,
    )
    batch = collate([a, b], tokenizer.pad_token_id)
    n = len(a.input_ids)
    assert batch["attention_mask"][0, n:].sum() == 0
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()


def test_demo_silos_are_deterministic_non_iid_and_disjoint(tmp_path: Path) -> None:
    p1 = make_demo_silos(tmp_path / "a", seed=3)
    p2 = make_demo_silos(tmp_path / "b", seed=3)
    for silo in p1:
        assert p1[silo]["train"].read_bytes() == p2[silo]["train"].read_bytes()
        train = {r[0]["content"] for r in read_records(p1[silo]["train"])}
        held = {r[0]["content"] for r in read_records(p1[silo]["eval"])}
        assert not train & held
    answers = {s: {r[-1]["content"] for r in read_records(p1[s]["train"])} for s in p1}
    assert not answers["clinic"] & answers["bank"]  # different tasks, different label sets
    union = (tmp_path / "a" / "union_eval.jsonl").read_text().splitlines()
    assert len(union) == sum(len(p1[s]["eval"].read_text().splitlines()) for s in p1)


def test_per_sequence_loss_matches_a_naive_loop() -> None:
    import torch

    from silotune.data import per_sequence_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=gen)
    labels = torch.full((3, 6), IGNORE_INDEX)
    labels[0, 3:] = torch.tensor([1, 2, 3])
    labels[1, 1:] = torch.tensor([4, 5, 6, 7, 8])
    labels[2, 5] = int(logits[2, 4].argmax())  # one answer token that greedy decoding gets right
    loss, counts, exact = per_sequence_loss(logits, labels)
    for b in range(3):
        terms = [
            torch.nn.functional.cross_entropy(logits[b, t - 1][None], labels[b, t][None])
            for t in range(1, 6)
            if labels[b, t] != IGNORE_INDEX
        ]
        assert torch.allclose(loss[b], torch.stack(terms).mean())
        assert int(counts[b]) == len(terms)
    assert exact is not None and exact.tolist() == [False, False, True]
    assert per_sequence_loss(logits, labels, with_exact=False)[2] is None


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_binary_or_non_utf8_file_names_the_file_and_offset(tmp_path: Path, suffix: str) -> None:
    good = json.dumps({"instruction": "q", "response": "a"}) + "\n"
    p = tmp_path / f"latin1{suffix}"
    p.write_bytes(good.encode() + "caf\xe9".encode("latin-1"))
    with pytest.raises(DataError) as info:
        read_records(p)
    msg = str(info.value)
    assert str(p) in msg and f"offset {len(good) + 3}" in msg and "\n" not in msg
    (tmp_path / f"blob{suffix}").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(DataError, match=r"blob.*not UTF-8 text \(byte 0x89 at offset 0"):
        read_records(tmp_path / f"blob{suffix}")
