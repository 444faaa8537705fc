"""Silo datasets: reading local files, chat formatting, response-only labels.

A record is either an instruction pair or a chat::

    {"instruction": "...", "response": "...", "system": "optional"}
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
    {"prompt": "...", "chosen": "...", "rejected": "...", "system": "optional"}   (a preference pair)

Files are JSON Lines (``.jsonl``), a JSON array (``.json``) or Parquet
(``.parquet``), loaded into a ``datasets.Dataset``. The tokenizer's chat
template is applied; only assistant tokens (up to and including the end-of-turn
token) carry a loss, so the model is trained to answer, not to echo prompts.

Preference pairs feed DPO (:func:`read_preferences`); read as plain chats
(:func:`read_records`) they are the prompt with its chosen answer, so a
preference silo can also do instruction tuning.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from silotune.errors import DataError

IGNORE_INDEX = -100
_ROLES = {"system", "user", "assistant"}


_PAIR_KEYS = ("prompt", "chosen", "rejected")


def _is_pair(rec: Any) -> bool:
    return isinstance(rec, dict) and any(k in rec for k in ("chosen", "rejected"))


def _check_pair(rec: Any, where: str) -> dict[str, str]:
    """Return a preference record ``{prompt, chosen, rejected[, system]}``; DataError names ``where``."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if not _is_pair(rec):
        raise DataError(
            f"{where}: a preference record needs 'prompt', 'chosen' and 'rejected'; got keys {sorted(rec)}"
        )
    for key in _PAIR_KEYS:
        if not isinstance(rec.get(key), str) or not rec[key].strip():
            raise DataError(f"{where}: field {key!r} must be a non-empty string")
    if rec["chosen"] == rec["rejected"]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical, so there is no preference")
    out = {k: rec[k] for k in _PAIR_KEYS}
    if isinstance(rec.get("system"), str) and rec["system"]:
        out["system"] = rec["system"]
    return out


def _pair_chat(pair: dict[str, str], answer: str) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": pair["system"]}] if "system" in pair else []
    return [
        *msgs,
        {"role": "user", "content": pair["prompt"]},
        {"role": "assistant", "content": pair[answer]},
    ]


def _check_record(rec: Any, where: str) -> list[dict[str, str]]:
    """Return the record as chat messages, or raise DataError naming ``where``."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if _is_pair(rec):
        return _pair_chat(_check_pair(rec, where), "chosen")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise DataError(f"{where}: messages[{i}] must have string 'role' and 'content'")
            if m["role"] not in _ROLES:
                raise DataError(f"{where}: messages[{i}].role {m['role']!r} is not one of {sorted(_ROLES)}")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise DataError(f"{where}: no assistant message, so nothing to learn")
        return out
    if "instruction" in rec or "response" in rec:
        for key in ("instruction", "response"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise DataError(f"{where}: field {key!r} must be a non-empty string")
        msgs = []
        if isinstance(rec.get("system"), str) and rec["system"]:
            msgs.append({"role": "system", "content": rec["system"]})
        msgs.append({"role": "user", "content": rec["instruction"]})
        msgs.append({"role": "assistant", "content": rec["response"]})
        return msgs
    raise DataError(
        f"{where}: a record needs 'messages' or 'instruction' and 'response'; got keys {sorted(rec)}"
    )


def _utf8_text(p: Path) -> str:
    """The file as text; a binary or non-UTF-8 file is a DataError naming the file and the byte offset."""
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{p}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}: {exc.reason}); "
            "a dataset is a UTF-8 .jsonl/.json file or a .parquet file"
        ) from None


def _raw_records(path: str | Path) -> list[tuple[str, Any]]:
    """(location, record) for every record of a .jsonl/.json/.parquet file; locations name line or row."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"dataset file not found: {p}")
    suffix = p.suffix.lower()
    out: list[tuple[str, Any]] = []
    if suffix == ".jsonl":
        # split on "\n" only, as file iteration does: U+2028 may appear raw inside a JSON string
        for lineno, line in enumerate(_utf8_text(p).split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            out.append((f"{p}:{lineno}", rec))
    elif suffix == ".json":
        try:
            data = json.loads(_utf8_text(p))
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, list):
            raise DataError(f"{p}: a .json dataset must be an array of records")
        out = [(f"{p}[{i}]", r) for i, r in enumerate(data)]
    elif suffix == ".parquet":
        import datasets  # ~0.6 s to import; only Parquet files need it, and the workers import this module

        try:
            ds = datasets.Dataset.from_parquet(str(p))
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise DataError(f"{p}: cannot read Parquet file: {exc}") from None
        out = [(f"{p} row {i}", r) for i, r in enumerate(ds)]
    else:
        raise DataError(f"{p}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")
    if not out:
        raise DataError(f"{p}: the dataset is empty")
    return out


def read_records(path: str | Path) -> list[list[dict[str, str]]]:
    """Read and validate a silo's file into a list of chats. Errors name the file and line/row."""
    return [_check_record(rec, where) for where, rec in _raw_records(path)]


def read_preferences(path: str | Path) -> list[dict[str, str]]:
    """Read and validate a file of preference pairs ``{prompt, chosen, rejected[, system]}``."""
    return [_check_pair(rec, where) for where, rec in _raw_records(path)]


def is_preference_file(path: str | Path) -> bool:
    """Whether the file's first record is a preference pair."""
    return _is_pair(_raw_records(path)[0][1])


def load_dataset(path: str | Path) -> Any:
    """A ``datasets.Dataset`` with one ``messages`` column, validated record by record."""
    import datasets  # ~0.6 s to import; only training needs it, and the workers import this module at start

    return datasets.Dataset.from_dict({"messages": read_records(path)})


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def encode_chat(messages: Sequence[dict[str, str]], tokenizer: Any, max_len: int) -> Example | None:
    """Token ids with loss only on assistant turns; None if truncation leaves no response token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(list(messages[:i]), tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(list(messages[: i + 1]), tokenize=False)
        if not full.startswith(prompt):
            raise DataError("the chat template does not render a prompt as a prefix of its answer")
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        # Learn the answer and its end-of-turn token, not the template's trailing whitespace.
        if eos in answer_ids:
            answer_ids = answer_ids[: answer_ids.index(eos) + 1]
        new_prompt = prompt_ids[len(ids) :] if prompt_ids[: len(ids)] == ids else None
        if new_prompt is None:
            raise DataError("the chat template does not render earlier turns as a token prefix")
        ids += new_prompt
        labels += [IGNORE_INDEX] * len(new_prompt)
        ids += answer_ids
        labels += answer_ids
    ids, labels = ids[:max_len], labels[:max_len]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return Example(ids, labels)


def encode_dataset(chats: Sequence[Sequence[dict[str, str]]], tokenizer: Any, max_len: int) -> list[Example]:
    out = [e for e in (encode_chat(c, tokenizer, max_len) for c in chats) if e is not None]
    if not out:
        raise DataError(f"no example keeps a response token within max_seq_len={max_len}")
    return out


@dataclass(frozen=True)
class PreferenceExample:
    """A preference pair, encoded: the same prompt with the chosen and with the rejected answer."""

    chosen: Example
    rejected: Example


def encode_preferences(
    pairs: Sequence[dict[str, str]], tokenizer: Any, max_len: int
) -> list[PreferenceExample]:
    """Encode pairs; a pair is dropped when truncation leaves either answer without a token."""
    out = []
    for pair in pairs:
        c = encode_chat(_pair_chat(pair, "chosen"), tokenizer, max_len)
        r = encode_chat(_pair_chat(pair, "rejected"), tokenizer, max_len)
        if c is not None and r is not None:
            out.append(PreferenceExample(c, r))
    if not out:
        raise DataError(f"no preference pair keeps a response token within max_seq_len={max_len}")
    return out


def encode_file(path: str | Path, tokenizer: Any, max_len: int, *, pairs: bool) -> list[Any]:
    """A silo file as training examples: preference pairs if ``pairs`` (else chats, pairs read as chosen)."""
    if pairs:
        return encode_preferences(read_preferences(path), tokenizer, max_len)
    return encode_dataset(read_records(path), tokenizer, max_len)


def collate(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding carries no loss and no attention."""
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attn[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attn}


def batches(
    examples: Sequence[Example], batch_size: int, *, steps: int, generator: torch.Generator
) -> Iterator[list[Example]]:
    """``steps`` batches drawn by reshuffling epochs with ``generator`` (deterministic per seed)."""
    order: list[int] = []
    for _ in range(steps):
        batch = []
        while len(batch) < min(batch_size, len(examples)):
            if not order:
                order = torch.randperm(len(examples), generator=generator).tolist()
            batch.append(examples[order.pop()])
        yield batch


def per_sequence_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, with_exact: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Mean token loss of each sequence over its response tokens.

    Returns (loss per sequence [B], response-token count per sequence [B],
    per-sequence greedy exact match [B] or None when ``with_exact`` is False:
    every response token is the argmax). One example is the privacy unit, so
    the batch loss is the mean of these.

    The labels are shifted, not the logits: slicing ``logits[:, :-1]`` and
    reshaping copies the whole [B, T, vocab] tensor (~100 MB at 4 × 128 × 49152),
    which cost 3-5 % of a training step (bench/train_throughput.py).
    """
    if logits.size(1) > labels.size(1):
        # Prompt tuning prepends virtual tokens: their positions carry no label.
        logits = logits[:, -labels.size(1) :]
    shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    mask = shift_labels != IGNORE_INDEX
    tok_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    counts = mask.sum(dim=1)
    seq_loss = tok_loss.sum(dim=1) / counts.clamp_min(1)
    if not with_exact:
        return seq_loss, counts, None
    with torch.no_grad():
        exact = ((logits.argmax(dim=-1) == shift_labels) | ~mask).all(dim=1) & (counts > 0)
    return seq_loss, counts, exact
