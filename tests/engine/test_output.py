"""OutputProcessor (incremental detokenization + stop strings) against the engine's whole-output algorithm, over
the byte tokenizer, a SentencePiece-style byte-fallback tokenizer and (when cached here) SmolLM2's tokenizer."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.engine import output as output_mod
from server.engine.output import OutputProcessor, detokenization_caveats, hidden_special_tokens
from tests.tiny_tokenizer import byte_tokenizer

SMOLLM2 = Path.home() / ".cache" / "qlora-server" / "models" / "SmolLM2-135M-Instruct"


# --- the reference: the engine's whole-output algorithm (re-decode everything each step), as it was --------------

def _with_specials(text, specials):
    """``text`` with each hidden special's rendering put back at its offset; spans (start, end, visible offset)."""
    if not specials:
        return text, []
    parts, spans = [], []
    prev = length = 0
    for offset, shown in specials:
        offset = min(max(offset, prev), len(text))
        parts.append(text[prev:offset])
        length += offset - prev
        spans.append((length, length + len(shown), offset))
        parts.append(shown)
        length += len(shown)
        prev = offset
    parts.append(text[prev:])
    return "".join(parts), spans


def _visible_index(i, spans):
    shift = 0
    for start, end, offset in spans:
        if i <= start:
            break
        if i < end:
            return offset
        shift += end - start
    return i - shift


def reference(tok, hidden, stops, ids):
    """(final text, index of the token that completed a stop string or None, final match text)."""
    def decode(gen):
        return tok.decode(gen, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    generated, specials = [], []
    match = ""
    for k, t in enumerate(ids):
        if t in hidden:
            specials.append((len(decode(generated)), hidden[t]))
        generated.append(t)
        text = decode(generated)
        match, spans = _with_specials(text, specials)
        hit = min((i for i in (match.find(s) for s in stops) if i >= 0), default=-1)
        if hit >= 0:
            return text[:_visible_index(hit, spans)], k, match
    return decode(generated), None, match


def check(tok, hidden, stops, ids):
    """Stream ``ids`` through a processor: every streamed prefix is a prefix of the reference's final text, the
    stop comes at the reference's token, and everything streamed (+ finish) is the reference's final text."""
    want, stop_at, _ = reference(tok, hidden, stops, ids)
    proc = OutputProcessor(tok, stops, hidden)
    streamed = ""
    stopped_at = None
    for k, t in enumerate(ids):
        text, stopped = proc.push(t)
        streamed += text
        assert want.startswith(streamed), (streamed, want)
        if not any(t in hidden for t in ids[:k + 1]):  # no renderings: the match text is the visible text
            assert not any(s in streamed for s in stops), streamed
        if stopped:
            stopped_at = k
            break
    else:
        streamed += proc.finish()
    assert stopped_at == stop_at
    assert streamed == want
    assert proc.emitted_chars == len(want)
    assert proc.finish() == "" and proc.done
    assert proc.unstable_decodes == 0


def stops_strategy(match_text, extra_alphabet, renderings):
    """Stop strings: substrings of the output's match text (incl. ones spanning tokens and special renderings),
    the renderings themselves, random text, and prefixes of each other."""
    n = len(match_text)
    substring = (st.integers(0, n - 1).flatmap(lambda i: st.integers(i + 1, min(n, i + 8)).map(
        lambda j: match_text[i:j])) if n else st.nothing())
    one = st.one_of(substring, st.sampled_from(sorted(renderings)) if renderings else st.nothing(),
                    st.text(alphabet=extra_alphabet, min_size=1, max_size=4))
    one = one.filter(lambda s: "\ufffd" not in s)  # refused by SamplingParams.validate (tests/engine/test_types.py)
    return st.lists(one, max_size=4).flatmap(
        lambda stops: st.lists(st.sampled_from(stops).flatmap(lambda s: st.integers(1, len(s)).map(lambda k: s[:k])),
                               max_size=2).map(lambda prefixes: tuple(stops + prefixes)) if stops
        else st.just(()))


# --- the byte tokenizer (GPT-2 byte alphabet, one token per byte) -------------------------------------------------

@functools.lru_cache(maxsize=1)
def _byte_setup():
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>", "<|im_start|>", tok.convert_ids_to_tokens(35)]})
    tok.add_tokens(["<tool>"])  # added but not special: visible text
    hidden = hidden_special_tokens(tok)
    assert set(hidden) >= {0, 35, tok.convert_tokens_to_ids("<|end|>"), tok.convert_tokens_to_ids("<|im_start|>")}
    assert tok.convert_tokens_to_ids("<tool>") not in hidden
    return tok, hidden


def _byte_units(tok):
    special = [0, 35, *(tok.convert_tokens_to_ids(t) for t in ("<|end|>", "<|im_start|>", "<tool>"))]
    return st.one_of(
        st.sampled_from([[b] for b in b"ab <|>\n.e"]),
        st.sampled_from([list(c.encode()) for c in "é日😀\ufffd"]),  # whole multi-byte characters, byte by byte
        st.sampled_from([[b] for b in (0x80, 0xBF, 0xC3, 0xE6, 0xF0, 0x97, 0x9F, 0xA9)]),  # lone / stray bytes
        st.sampled_from([[t] for t in special]),
    )


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_byte_tokenizer_matches_whole_output_algorithm(data):
    tok, hidden = _byte_setup()
    ids = [t for unit in data.draw(st.lists(_byte_units(tok), max_size=24), label="units") for t in unit]
    _, _, match = reference(tok, hidden, (), ids)
    stops = data.draw(stops_strategy(match, "ab <|>.é日😀\ufffd#\x00", set(hidden.values())), label="stops")
    check(tok, hidden, stops, ids)


# --- SmolLM2's tokenizer (byte-level BPE: multi-byte characters split across tokens) -----------------------------

@functools.lru_cache(maxsize=1)
def _smol_setup():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SMOLLM2))
    hidden = hidden_special_tokens(tok)
    samples = ["Hello, world! ", "café naïve ", "日本語のテキスト", "emoji 😀🎉 ok", " <|im_start|>user\n",
               "Привет, мир", "a\u0301 ∑ x² ≤ 3"]
    pieces = sorted({t for s in samples for t in tok.encode(s, add_special_tokens=False)})
    return tok, hidden, pieces


smol = pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").is_file(),
                          reason=f"SmolLM2 tokenizer not cached at {SMOLLM2} (run the server once to fetch it)")


@smol
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_smollm2_tokenizer_matches_whole_output_algorithm(data):
    tok, hidden, pieces = _smol_setup()
    unit = st.one_of(st.sampled_from(pieces), st.integers(0, len(tok) - 1), st.sampled_from(range(0, 17)))
    ids = data.draw(st.lists(unit, max_size=24), label="ids")
    _, _, match = reference(tok, hidden, (), ids)
    stops = data.draw(stops_strategy(match, "ab <|>é日😀\ufffd\n", set(hidden.values())), label="stops")
    check(tok, hidden, stops, ids)


@smol
def test_smollm2_has_no_caveats_and_splits_characters():
    tok, hidden, _ = _smol_setup()
    assert detokenization_caveats(tok) == []
    assert {0, 1, 2} <= set(hidden)
    ids = tok.encode("日本語 😀", add_special_tokens=False)
    assert any(tok.decode([t]).endswith("\ufffd") for t in ids)  # the premise: characters split over tokens
    proc = OutputProcessor(tok, (), hidden)
    pieces = [proc.push(t)[0] for t in ids] + [proc.finish()]
    assert "".join(pieces) == "日本語 😀" and not any("\ufffd" in p for p in pieces)


# --- a SentencePiece-style byte-fallback tokenizer (one U+FFFD per byte token; Strip drops the first space) -------

@functools.lru_cache(maxsize=1)
def _fallback_setup():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "a", "b", "▁a", "▁b", "ab", "<", ">", "|", ".", "▁."]:
        vocab[piece] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hidden = hidden_special_tokens(tok)
    assert set(hidden) >= {1, 2}
    return tok, hidden, vocab


def test_byte_fallback_holds_every_replacement_character_of_an_incomplete_character():
    tok, hidden, vocab = _fallback_setup()
    ids = [vocab["▁a"], *(vocab[f"<0x{b:02X}>"] for b in "日".encode()), vocab["▁b"]]
    assert tok.decode(ids[:3]) == "a\ufffd\ufffd"  # the premise: one U+FFFD per byte token so far
    proc = OutputProcessor(tok, ("x",), hidden)
    out = [proc.push(t) for t in ids]
    assert [text for text, _ in out] == ["a", "", "", "日", " b"] and not any(stop for _, stop in out)
    assert proc.finish() == ""


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_byte_fallback_tokenizer_matches_whole_output_algorithm(data):
    """Valid output only: an invalid byte turns its whole byte run into U+FFFD, even characters already streamed
    (see ``detokenization_caveats``), which no streaming can take back."""
    tok, hidden, vocab = _fallback_setup()
    words = [[vocab[p]] for p in ["▁", "a", "b", "▁a", "▁b", "ab", "<", ">", "|", ".", "▁."]]
    chars = [[vocab[f"<0x{b:02X}>"] for b in c.encode()] for c in "é日😀\ufffd"]
    unit = st.one_of(st.sampled_from(words), st.sampled_from(chars), st.sampled_from([[1], [2]]))
    units = data.draw(st.lists(unit, max_size=20), label="units")
    # A word after each special token: decoding skips hidden specials, so byte runs on both sides of one would
    # fuse into one run, and an incomplete character after it turns the whole-output reference's finished one
    # before it into U+FFFD (the invalid-run caveat above), which no streaming can (or should) reproduce.
    ids = [t for u in units for t in (u + [vocab["a"]] if u in ([1], [2]) else u)]
    _, _, match = reference(tok, hidden, (), ids)
    stops = data.draw(stops_strategy(match, "ab <|>.é日\ufffd", set(hidden.values())), label="stops")
    check(tok, hidden, stops, ids)


def test_byte_fallback_caveat_is_reported():
    tok, _, _ = _fallback_setup()
    assert any("byte-fallback" in r for r in detokenization_caveats(tok))
    assert detokenization_caveats(byte_tokenizer()) == []


# --- examples and the cost bound ------------------------------------------------------------------------------

def test_stop_spanning_a_hidden_special_token_and_one_equal_to_its_rendering():
    tok, hidden = _byte_setup()
    end = tok.convert_tokens_to_ids("<|end|>")
    ids = [*b"hi", end, *b"there"]
    for stops, want in (((">th",), "hi"), (("<|end|>",), "hi"), (("i<|e",), "h"), (("end|>thx", "ere"), "hith")):
        proc = OutputProcessor(tok, stops, hidden)
        streamed, stopped = "", False
        for t in ids:
            text, stopped = proc.push(t)
            streamed += text
            if stopped:
                break
        assert stopped and streamed == want, (stops, streamed)


def test_text_that_may_start_a_stop_string_is_held_until_decided():
    tok, hidden = _byte_setup()
    proc = OutputProcessor(tok, ("abc", "bd"), hidden)
    assert [proc.push(t) for t in b"xab"] == [("x", False), ("", False), ("", False)]
    assert proc.push(ord("x")) == ("abx", False)
    assert proc.push(ord("a")) == ("", False)
    assert proc.finish() == "a"


def test_per_token_decode_does_not_grow_with_the_output():
    """Every decode call sees a bounded window of ids, and the stop search a bounded text, however long the
    output (counted, not timed)."""
    tok, hidden = _byte_setup()
    sizes = []

    class Counting:
        def decode(self, ids, **kwargs):
            sizes.append(len(ids))
            return tok.decode(ids, **kwargs)

    proc = OutputProcessor(Counting(), ("zzz", "日本x"), hidden)
    text = ("lorem ipsum 日本語 😀 " * 60).encode()
    streamed = "".join(proc.push(t)[0] for t in text) + proc.finish()
    assert streamed == text.decode()
    assert max(sizes) <= output_mod._WINDOW_TOKENS + 4  # window + the bytes of one pending character
    assert len(sizes) <= 1.2 * len(text)  # about one decode per token
    assert len(proc._tail) <= 2 and len(proc._unsent) <= 2 and len(proc._window) <= output_mod._WINDOW_TOKENS + 4


def test_misuse():
    tok, hidden = _byte_setup()
    with pytest.raises(ValueError):
        OutputProcessor(tok, ("",), hidden)
    proc = OutputProcessor(tok, ("b",), hidden)
    assert proc.push(ord("a")) == ("a", False)
    assert proc.push(ord("b")) == ("", True)
    assert proc.finish() == ""
    with pytest.raises(RuntimeError):
        proc.push(ord("c"))
