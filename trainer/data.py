"""Reads, validates and tokenizes JSONL training data; every error names its file and line number."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import FailedPrecondition, InvalidArgument

#: Label value the loss ignores (``torch.nn.CrossEntropyLoss``'s default ``ignore_index``).
IGNORE_INDEX = -100
_ROLES = ("system", "user", "assistant")
#: How many line errors a ``DataError`` message lists before summarising the rest.
_MAX_LISTED_ERRORS = 10


class DataError(InvalidArgument):
    """A training file is unusable. ``errors`` holds every ``(line_number, message)`` found (1-based lines);
    the message lists the first few. ``field`` is ``"dataset"`` or ``"eval_dataset"``."""

    def __init__(self, path: Path, errors: Sequence[tuple[int, str]], field: str = "dataset") -> None:
        self.path = Path(path)
        self.errors = list(errors)
        shown = "; ".join(f"line {line}: {msg}" for line, msg in self.errors[:_MAX_LISTED_ERRORS])
        more = len(self.errors) - _MAX_LISTED_ERRORS
        tail = f"; and {more} more bad line(s)" if more > 0 else ""
        super().__init__(f"{path}: {len(self.errors)} bad line(s): {shown}{tail}", field=field)


@dataclass(frozen=True)
class Example:
    """One validated record: a chat of ``{"role", "content"}`` messages (prompt/completion records become a user
    turn and an assistant turn). ``line`` is its 1-based line number in the source file."""

    line: int
    messages: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and labels of one example (equal length, ``<= max_seq_length``).

    ``labels[i]`` is ``input_ids[i]`` where token ``i`` belongs to an assistant turn (its content and its
    end-of-turn token) and ``IGNORE_INDEX`` elsewhere; the causal-LM loss shifts them by one inside the model.
    """

    line: int
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    truncated: bool = False

    @property
    def num_supervised(self) -> int:
        """Tokens that carry loss."""
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (the data fingerprint recorded in the model card and checked on resume)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_record(obj: Any) -> tuple[dict[str, str], ...]:
    """Validate one decoded JSON line and return its messages.

    Accepts ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role": ..., "content": str}, ...]}`` with
    roles ``system``/``user``/``assistant`` and at least one assistant turn (the supervised part). Extra keys are
    ignored.

    Raises:
        ValueError: with a message saying what is wrong (the caller adds the line number).
    """
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    has_pc = "prompt" in obj or "completion" in obj
    has_msgs = "messages" in obj
    if has_pc and has_msgs:
        raise ValueError("has both 'messages' and 'prompt'/'completion'; use one format")
    if has_pc:
        for key in ("prompt", "completion"):
            if not isinstance(obj.get(key), str):
                raise ValueError(f"'{key}' must be a string")
        if not obj["completion"]:
            raise ValueError("'completion' is empty")
        return ({"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]})
    if not has_msgs:
        raise ValueError("needs 'messages' or 'prompt' and 'completion'")
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object")
        if m.get("role") not in _ROLES:
            raise ValueError(f"messages[{i}].role must be one of {_ROLES}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant message, so nothing to learn (zero supervised tokens)")
    return tuple(out)


def read_jsonl(path: str | Path, field: str = "dataset") -> list[Example]:
    """Read and validate every line of a JSONL file before returning anything. Blank lines are skipped.

    Raises:
        DataError: listing every bad line (invalid JSON, wrong shape) with its 1-based number.
        InvalidArgument: the file cannot be read or holds no examples.
    """
    path = Path(path)
    examples: list[Example] = []
    errors: list[tuple[int, str]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    examples.append(Example(lineno, parse_record(json.loads(raw))))
                except json.JSONDecodeError as exc:
                    errors.append((lineno, f"invalid JSON: {exc.msg} (column {exc.colno})"))
                except ValueError as exc:
                    errors.append((lineno, str(exc)))
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{path}: not UTF-8 text: {exc}", field=field) from exc
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc}", field=field) from exc
    if errors:
        raise DataError(path, errors, field=field)
    if not examples:
        raise InvalidArgument(f"{path}: no examples", field=field)
    return examples


def _render(tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode(tokenizer, text: str) -> list[int]:
    # The chat template already wrote any BOS / special tokens as text.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn: the tokenizer's EOS (``<|im_end|>`` for ChatML models like SmolLM2).

    Raises:
        FailedPrecondition: the tokenizer has no EOS token.
    """
    if tokenizer.eos_token_id is None:
        raise FailedPrecondition("the tokenizer has no eos_token; cannot mark the end of a completion", field="model")
    return int(tokenizer.eos_token_id)


def tokenize_example(example: Example, tokenizer, max_seq_length: int, truncate: bool) -> TokenizedExample:
    """Render ``example`` with the tokenizer's chat template and mark the supervised tokens.

    The text is cut at each assistant turn: everything before it (rendered with ``add_generation_prompt=True``,
    exactly the prompt a server would send) is context with label ``IGNORE_INDEX``; the turn's own tokens up to and
    including its end-of-turn token (EOS) are supervised; template text after the EOS (e.g. ChatML's newline) is
    context again. When the template writes no EOS after a turn, one is appended and supervised, so the model always
    learns to stop — also when pad = eos, because labels are built here, never derived from padding. Trailing
    context after the last supervised token is dropped (it never reaches the model at inference time).

    Returns:
        ``TokenizedExample`` with at least one supervised token.

    Raises:
        ValueError: the example is longer than ``max_seq_length`` tokens and ``truncate`` is false, or it keeps no
            supervised token after truncation, or the template is not prefix-stable (the caller adds the line).
        FailedPrecondition: the tokenizer has no chat template or no EOS token.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise FailedPrecondition("the tokenizer has no chat template", field="model")
    eos = end_of_turn_id(tokenizer)
    msgs = list(example.messages)
    ids: list[int] = []
    labels: list[int] = []
    consumed = ""  # rendered text covered by ``ids`` so far
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt_text = _render(tokenizer, msgs[:i], add_generation_prompt=True)
        through_text = _render(tokenizer, msgs[: i + 1], add_generation_prompt=False)
        if not prompt_text.startswith(consumed) or not through_text.startswith(prompt_text):
            raise ValueError("the chat template does not render this conversation as a growing prefix; cannot "
                             "tell prompt from completion")
        context = _encode(tokenizer, prompt_text[len(consumed):])
        turn = _encode(tokenizer, through_text[len(prompt_text):])
        if eos in turn:
            end = len(turn) - turn[::-1].index(eos)  # through the last EOS of this turn
            supervised, after = turn[:end], turn[end:]
        else:
            supervised, after = turn + [eos], []
        ids += context + supervised + after
        labels += [IGNORE_INDEX] * len(context) + supervised + [IGNORE_INDEX] * len(after)
        consumed = through_text
    while labels and labels[-1] == IGNORE_INDEX:  # trailing template text after the final EOS
        labels.pop()
        ids.pop()
    truncated = False
    if len(ids) > max_seq_length:
        if not truncate:
            raise ValueError(f"{len(ids)} tokens > max_seq_length {max_seq_length} (set truncate: true to cut "
                             "long examples instead)")
        ids, labels, truncated = ids[:max_seq_length], labels[:max_seq_length], True
    result = TokenizedExample(example.line, tuple(ids), tuple(labels), truncated)
    if result.num_supervised == 0:
        raise ValueError("no supervised (completion/assistant) token left"
                         + (f" after truncation to {max_seq_length} tokens" if truncated else ""))
    return result


def tokenize_examples(examples: Sequence[Example], tokenizer, max_seq_length: int, truncate: bool,
                      path: str | Path = "<data>", field: str = "dataset") -> list[TokenizedExample]:
    """Tokenize every example; collect all failures before raising.

    Raises:
        DataError: one entry per rejected example, with its line number.
    """
    out, errors = [], []
    for ex in examples:
        try:
            out.append(tokenize_example(ex, tokenizer, max_seq_length, truncate))
        except ValueError as exc:
            errors.append((ex.line, str(exc)))
    if errors:
        raise DataError(Path(path), errors, field=field)
    return out


def load_tokenized(path: str | Path, tokenizer, max_seq_length: int, truncate: bool,
                   field: str = "dataset") -> list[TokenizedExample]:
    """``read_jsonl`` + ``tokenize_examples``: the whole file is validated before anything is returned."""
    return tokenize_examples(read_jsonl(path, field), tokenizer, max_seq_length, truncate, path, field)


def split_train_eval(items: Sequence[Any], eval_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Deterministic shuffled split: ``round(len · eval_fraction)`` items (at least 1 when the fraction is > 0)
    go to eval, the rest (in original order) to train.

    Raises:
        InvalidArgument: the split would leave no training example (``field="eval_fraction"``).
    """
    n = len(items)
    if eval_fraction <= 0:
        return list(items), []
    n_eval = max(1, round(n * eval_fraction))
    if n_eval >= n:
        raise InvalidArgument(f"holding out {n_eval} of {n} examples leaves none to train on", field="eval_fraction")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    return ([x for i, x in enumerate(items) if i not in eval_idx], [x for i, x in enumerate(items) if i in eval_idx])


def to_features(examples: Sequence[TokenizedExample]) -> list[dict[str, list[int]]]:
    """Plain dicts (``input_ids``, ``attention_mask``, ``labels``) for a ``torch.utils.data`` dataset and
    ``transformers.DataCollatorForSeq2Seq`` (which right-pads labels with ``IGNORE_INDEX``)."""
    return [{"input_ids": list(e.input_ids), "attention_mask": [1] * len(e.input_ids), "labels": list(e.labels)}
            for e in examples]


def make_collator(tokenizer, packing: bool, pad_to_multiple_of: int | None = None):
    """The ``transformers`` data collator that turns ``to_features`` dicts into one micro-batch.

    ``packing=False``: ``DataCollatorForSeq2Seq`` right-pads to the longest example (rounded up to
    ``pad_to_multiple_of`` tokens when given, so that batch shapes repeat and a captured CUDA graph of the step can
    replay, see ``trainer.step_graph``); returns ``input_ids``, ``attention_mask`` and ``labels`` (padding labelled
    ``IGNORE_INDEX``), each int64 ``[batch, longest]``.

    ``packing=True``: ``DataCollatorWithFlattening`` concatenates the examples into one row with no padding;
    returns ``input_ids``, ``labels`` and ``position_ids``, each int64 ``[1, total tokens]``, and no
    ``attention_mask``. Position ids restart at 0 with every example; the first label of every example is
    ``IGNORE_INDEX``, so the causal-LM shift never predicts an example's first token from the previous example's
    last one (in the padded batch that label is never predicted either). The model keeps attention inside each
    example because transformers' mask builder (``masking_utils.find_packed_sequence_indices``) reads the example
    boundaries from the position ids when no attention mask and no KV cache is given -- hence
    ``prepare_for_qlora_training`` sets ``use_cache=False``. tests/trainer/test_packing.py checks both against the
    padded batch (logits, loss, LoRA gradients) and that no token sees another example.
    """
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX, return_tensors="pt")
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt",
                                  pad_to_multiple_of=pad_to_multiple_of)
