"""Tests of trainer.data: parsing, line-numbered errors, completion-only labels with EOS, truncation, splits."""

from __future__ import annotations

import pytest
from conftest import build_tokenizer, write_jsonl

from server.errors import InvalidArgument
from trainer.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    load_tokenized,
    read_jsonl,
    split_train_eval,
    tokenize_example,
)

PC = {"prompt": "hi there", "completion": "OK"}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(pad_is_eos=True)


def _supervised_text(tok, te):
    return tok.decode([t for t in te.labels if t != IGNORE_INDEX])


def test_prompt_is_masked_and_eos_is_supervised_when_pad_is_eos(tok):
    assert tok.pad_token_id == tok.eos_token_id  # the hard case: padding-based masking would drop EOS
    te = tokenize_example(Example(1, ({"role": "user", "content": "hi there"},
                                      {"role": "assistant", "content": "OK"})), tok, 512, False)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=False,
                                     add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert list(te.input_ids[:n_prompt]) == tok(prompt, add_special_tokens=False)["input_ids"]
    assert all(label == IGNORE_INDEX for label in te.labels[:n_prompt])
    assert list(te.labels[n_prompt:]) == list(te.input_ids[n_prompt:])
    assert te.labels[-1] == tok.eos_token_id  # the end-of-turn token carries loss
    assert [tok.convert_ids_to_tokens(t) for t in te.labels[n_prompt:]] == ["O", "K", "<|im_end|>"]


def test_multi_turn_supervises_every_assistant_turn_and_nothing_else(tok):
    msgs = ({"role": "system", "content": "sys"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "X"}, {"role": "user", "content": "b"},
            {"role": "assistant", "content": "YZ"})
    te = tokenize_example(Example(3, msgs), tok, 512, False)
    full = tok.apply_chat_template(list(msgs), tokenize=False)
    assert tok.decode(te.input_ids) == full.rstrip("\n")  # trailing newline after the final EOS is dropped
    sup = [tok.convert_ids_to_tokens(t) for t in te.labels if t != IGNORE_INDEX]
    assert sup == ["X", "<|im_end|>", "Y", "Z", "<|im_end|>"]


def test_eos_appended_when_template_writes_none(tok):
    plain = build_tokenizer()
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                          "{% if add_generation_prompt %}assistant: {% endif %}"
    te = tokenize_example(Example(1, ({"role": "user", "content": "q"}, {"role": "assistant", "content": "A"})),
                          plain, 512, False)
    assert te.labels[-1] == plain.eos_token_id and te.input_ids[-1] == plain.eos_token_id
    assert _supervised_text(plain, te).startswith("A")


def test_too_long_rejected_with_line_number_without_truncate(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PC, {"prompt": "x" * 200, "completion": "y"}, PC])
    with pytest.raises(DataError) as err:
        load_tokenized(path, tok, max_seq_length=64, truncate=False)
    assert [line for line, _ in err.value.errors] == [2]
    assert "line 2" in str(err.value) and "max_seq_length 64" in str(err.value)
    assert err.value.field == "dataset"


def test_too_long_truncated_when_asked_and_rejected_if_nothing_supervised_remains(tok, tmp_path):
    long_completion = {"prompt": "p", "completion": "y" * 200}
    long_prompt = {"prompt": "x" * 200, "completion": "y"}
    out = load_tokenized(write_jsonl(tmp_path / "a.jsonl", [PC, long_completion]), tok, 64, truncate=True)
    assert [len(e.input_ids) <= 64 for e in out] == [True, True]
    assert out[1].truncated and len(out[1].input_ids) == 64 and out[1].num_supervised > 0
    assert not out[0].truncated
    with pytest.raises(DataError) as err:
        load_tokenized(write_jsonl(tmp_path / "b.jsonl", [PC, PC, long_prompt]), tok, 64, truncate=True)
    assert err.value.errors[0][0] == 3 and "no supervised" in err.value.errors[0][1]


def test_bad_lines_all_reported_with_numbers_before_anything_is_used(tmp_path):
    rows = [PC, "{not json", PC, {"prompt": "only prompt"}, "", {"messages": [{"role": "user", "content": "q"}]},
            {"messages": [{"role": "bot", "content": "q"}]}, [1, 2], PC]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    lines = [line for line, _ in err.value.errors]
    assert lines == [2, 4, 6, 7, 8]  # line 5 is blank and skipped, good lines are not reported
    msgs = dict(err.value.errors)
    assert "invalid JSON" in msgs[2]
    assert "completion" in msgs[4]
    assert "no assistant" in msgs[6] and "zero supervised" in msgs[6]
    assert "role" in msgs[7]
    assert "JSON object" in msgs[8]
    assert str(path) in str(err.value)


def test_empty_file_and_missing_file_rejected(tmp_path):
    with pytest.raises(InvalidArgument, match="no examples"):
        read_jsonl(write_jsonl(tmp_path / "e.jsonl", ["", ""]))
    with pytest.raises(InvalidArgument, match="cannot read"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_split_is_deterministic_disjoint_and_keeps_training_data():
    items = list(range(50))
    tr, ev = split_train_eval(items, 0.2, seed=7)
    assert len(ev) == 10 and sorted(tr + ev) == items and not set(tr) & set(ev)
    assert split_train_eval(items, 0.2, seed=7) == (tr, ev)
    assert split_train_eval(items, 0.2, seed=8)[1] != ev
    assert split_train_eval(items, 0.0, seed=7) == (items, [])
    assert len(split_train_eval(items[:3], 0.01, seed=0)[1]) == 1
    with pytest.raises(InvalidArgument) as err:
        split_train_eval(items[:1], 0.5, seed=0)
    assert err.value.field == "eval_fraction"
