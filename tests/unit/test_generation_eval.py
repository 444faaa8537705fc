"""Free-running generation against teacher-forced exact match, and the text metrics."""

from __future__ import annotations

import math

import pytest
import torch

from silotune.data import IGNORE_INDEX, Example, collate, encode_dataset, per_sequence_loss, read_records
from silotune.evaluation import evaluate, generate_eval, split_answer, text_metrics


@pytest.fixture
def one_thread():
    """One torch thread: many tiny generate steps run faster without thread synchronisation."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _teacher_forced_exact(adapter, examples) -> list[bool]:
    batch = collate(examples, adapter.tokenizer.pad_token_id)
    with torch.no_grad():
        out = adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    _, _, exact = per_sequence_loss(out.logits, batch["labels"])
    return [bool(x) for x in exact]


def _own_and_real(adapter, demo_data) -> tuple[list[Example], list[Example]]:
    """Holdout examples whose answers are the model's own greedy continuation (exact), and the real ones."""
    adapter.load_state(adapter.initial_state(0))
    chats = read_records(demo_data["clinic"]["eval"])[:3] + read_records(demo_data["lab"]["eval"])[:3]
    real = encode_dataset(chats, adapter.tokenizer, 128)
    own = []
    for e in real:
        prompt, _ = split_answer(e)
        ids = torch.tensor([prompt])
        with torch.no_grad():
            gen = adapter.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=5,
                min_new_tokens=5,
                do_sample=False,
                pad_token_id=adapter.tokenizer.pad_token_id,
            )[0, len(prompt) :].tolist()
        own.append(Example(prompt + gen, [IGNORE_INDEX] * len(prompt) + gen))
    return own, real


def test_the_head_on_answer_positions_only_scores_as_the_full_logits(
    tiny_adapter, demo_data, one_thread, monkeypatch
) -> None:
    """evaluate() applies the LM head to the answer positions only: the same loss and exact match, example
    by example, as per_sequence_loss on the full logits (one example has no answer token)."""
    import silotune.evaluation as ev

    assert ev.response_head(tiny_adapter.model) is not None  # the tiny Llama takes the fast path
    own, real = _own_and_real(tiny_adapter, demo_data)
    empty = Example(real[0].input_ids, [IGNORE_INDEX] * len(real[0].input_ids))
    examples = [*own, *real, empty]
    batch = collate(examples, tiny_adapter.tokenizer.pad_token_id)
    with torch.no_grad():
        loss, exact = ev._response_loss(*ev.response_head(tiny_adapter.model), batch)
        out = tiny_adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    full_loss, _, full_exact = per_sequence_loss(out.logits, batch["labels"])
    assert torch.allclose(loss, full_loss, atol=1e-5) and loss[-1] == 0
    assert exact.tolist() == full_exact.tolist() == [True] * len(own) + [False] * (len(real) + 1)
    fast = evaluate(tiny_adapter, examples, batch_size=4)
    monkeypatch.setattr(ev, "response_head", lambda model: None)
    slow = evaluate(tiny_adapter, examples, batch_size=4)
    assert fast.exact_match == slow.exact_match and fast.loss == pytest.approx(slow.loss, abs=1e-6)


def test_free_running_exact_match_equals_teacher_forced_when_the_limit_covers_the_answer(
    tiny_adapter, demo_data, one_thread
) -> None:
    """Greedy decoding reproduces the reference iff every reference token is the argmax given its
    prefix: on answers that are the model's own greedy continuation both say yes, on the real
    references both say no, example by example (prompts of different lengths: left padding)."""
    own, real = _own_and_real(tiny_adapter, demo_data)
    examples = own + real
    tf = _teacher_forced_exact(tiny_adapter, examples)
    fr = generate_eval(tiny_adapter, examples, max_new_tokens=40, batch_size=4)
    assert fr.per_example_exact == tf
    assert tf[: len(own)] == [True] * len(own)
    assert not any(tf[len(own) :])
    assert evaluate(tiny_adapter, examples, batch_size=4).exact_match == pytest.approx(fr.exact_match)


def test_text_metrics_give_partial_credit() -> None:
    refs = ["The sodium result of patient 12 was high.", "cardiology"]
    same_r, same_c = text_metrics(refs, refs)
    assert same_r == pytest.approx(1.0) and same_c == pytest.approx(100.0)
    part_r, part_c = text_metrics(["The sodium result of patient 99 was low.", "neurology"], refs)
    assert 0.3 < part_r < 1.0 and 0.0 < part_c < 100.0


def test_compare_adapters_reuses_known_teacher_forced_scores_and_adds_generation(
    tiny_adapter, demo_data, one_thread
) -> None:
    from silotune.baselines import compare_adapters
    from silotune.evaluation import EvalResult

    state = tiny_adapter.initial_state(0)
    known = EvalResult(num_examples=4, loss=123.0, exact_match=0.5)
    comp = compare_adapters(
        tiny_adapter,
        {"a": state, "b": state},
        {"clinic": demo_data["clinic"]["eval"]},
        max_seq_len=96,
        batch_size=4,
        generate=["a"],
        max_new_tokens=3,
        scored={"a": {"clinic": known}},
    )
    a, b = comp.results["a"]["clinic"], comp.results["b"]["clinic"]
    assert (a.loss, a.exact_match) == (123.0, 0.5) and a.gen_exact_match == 0.0 and a.chrf is not None
    assert b.loss != 123.0 and b.gen_exact_match is None


def test_standard_error_is_the_sample_deviation_over_root_n() -> None:
    from silotune.evaluation import binary_standard_error, standard_error

    assert standard_error([1.0]) == 0.0
    assert standard_error([0.0, 1.0, 0.0, 1.0]) == pytest.approx(math.sqrt(1 / 3 / 4))
    flags = [1.0] * 18 + [0.0] * 102
    assert binary_standard_error(18 / 120, 120) == pytest.approx(standard_error(flags))
