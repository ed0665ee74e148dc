"""Stop strings that are (or contain) special tokens: matching sees the special tokens that decoding hides, a stop
string naming one special token also matches its id, and the returned text still omits special tokens."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.config import EngineConfig
from server.engine.engine import Engine, RequestStream, _Sequence
from server.engine.output import OutputProcessor
from server.engine.types import GenerationRequest, SamplingParams
from server.metrics import Metrics
from tests.engine_harness import build_engine
from tests.tiny import save_tiny_base
from tests.tiny_tokenizer import byte_tokenizer

PROMPT = "hello there"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("stop-special"))


def generate(eng, rid, **params):
    return eng.generate(GenerationRequest(request_id=rid, prompt=PROMPT,
                                          params=SamplingParams(**{"max_new_tokens": 16, **params})))


@pytest.fixture(scope="module")
def case(tmp_path_factory, base):
    """Greedy ids of the plain engine, and an engine whose tokenizer marks one of those ids special."""
    plain, _, _ = build_engine(tmp_path_factory.mktemp("plain"), base, {}, compute_dtype=torch.float32)
    try:
        ids = list(generate(plain, "plain").token_ids)
    finally:
        plain.stop()
    printable = [32 <= t < 127 for t in ids]
    # the first printable id between printable ones that did not occur before: it becomes the special token (its
    # neighbours printable, so stop strings spanning them hold no U+FFFD, which stop strings may not contain)
    k = next(i for i in range(1, len(ids) - 1)
             if printable[i - 1] and printable[i] and printable[i + 1] and ids[i] not in ids[:i])
    tok = byte_tokenizer()
    content = tok.convert_ids_to_tokens(ids[k])
    tok.add_special_tokens({"additional_special_tokens": [content]})
    assert tok.convert_tokens_to_ids(content) == ids[k] and ids[k] in tok.all_special_ids
    eng, _, _ = build_engine(tmp_path_factory.mktemp("special"), base, {}, compute_dtype=torch.float32,
                             tokenizer=tok)
    yield eng, tok, ids, k
    eng.stop()


def test_returned_text_omits_the_special_token(case):
    eng, tok, ids, k = case
    out = generate(eng, "no-stop")
    assert list(out.token_ids) == ids
    assert out.text == tok.decode(ids, skip_special_tokens=True) != tok.decode(ids, skip_special_tokens=False)


def test_stop_string_naming_the_special_token_matches_its_id(case):
    eng, tok, ids, k = case
    content = tok.convert_ids_to_tokens(ids[k])  # the token's own text, e.g. "(" for byte 40
    out = generate(eng, "by-id", stop=(content,))
    assert out.finish_reason == "stop"
    assert out.text == tok.decode(ids[:k], skip_special_tokens=True)
    assert list(out.token_ids) == ids[:k]  # like EOS, the token that ends the request by id is not output


def test_a_stop_token_that_is_eos_counts_like_eos():
    """The same output reports the same completion tokens whether it ended on EOS or on a stop naming EOS (or on
    any other stop token matched by id): the ending token is not output."""
    eng, tok = _scripted_engine([])
    eos = tok.eos_token_id
    assert eos in eng.eos_ids
    results = {}
    for name, stops in (("eos", ()), ("stop-eos", (tok.convert_ids_to_tokens(eos),))):
        params = SamplingParams(max_new_tokens=8, stop=stops)
        seq = _Sequence(request=GenerationRequest(name, prompt="x", params=params), stream=RequestStream(name, eng),
                        prompt_ids=[1], arrival=time.monotonic(), label="base", seed=0,
                        output=OutputProcessor(tok, stops, eng._hidden_specials), stop_ids=eng._stop_token_ids(stops))
        for t in (ord("a"), ord("b"), eos):
            eng._accept(seq, t)
        assert seq.done
        results[name] = list(seq.generated)
    assert results["eos"] == results["stop-eos"] == [ord("a"), ord("b")]


@pytest.mark.parametrize("start,end", [(0, 1), (-1, 1), (0, 2), (-1, 2)])
def test_stop_string_spanning_the_special_token_matches_its_text(case, start, end):
    """Stop strings made of the decoded text around the special token: ``start`` / ``end`` tokens relative to
    it (-1 = from the token before it, 2 = through the token after it)."""
    eng, tok, ids, k = case
    stop = tok.decode(ids[k + start:k + end], skip_special_tokens=False)
    assert tok.decode([ids[k]], skip_special_tokens=False) in stop
    out = generate(eng, f"by-text{start}{end}", stop=(stop,))
    assert out.finish_reason == "stop"
    assert out.text == tok.decode(ids[:k + min(start, 0)], skip_special_tokens=True)


def test_issue_case_on_the_embedded_model(tmp_path):
    """Issue 7, 9b, on SmolLM2-135M-Instruct: greedy's first token is ``<|im_start|>``; with that stop string the
    request ends ``stop`` with empty text instead of writing a fake user turn."""
    from server.adapters.cache import AdapterCache
    from server.adapters.store import AdapterStore
    from server.adapters.types import BaseModelSpec
    from server.config import ModelConfig
    from server.model.base import load_base_model
    from server.model.embedded import ensure_converted
    from server.model.runner import build_runner

    model_cfg = ModelConfig(compute_dtype="float32", device="cpu")
    model_dir = ensure_converted(model_cfg.cache_dir)
    model, tokenizer, info = load_base_model(ModelConfig(model=str(model_dir), compute_dtype="float32",
                                                         device="cpu"))
    cfg = EngineConfig(adapter_slots=1, max_lora_rank=8)
    runner = build_runner(model, cfg, torch.float32, 512)
    store = AdapterStore(tmp_path / "store", BaseModelSpec.from_model(model, info.name, cfg.max_lora_rank))
    metrics = Metrics()
    eng = Engine(model, tokenizer, runner, AdapterCache(store, runner.banks, 1, metrics), cfg, metrics,
                 max_total_tokens=512)
    eng.start()
    prompt = ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help you today?<|im_end|>\n")
    try:
        free = eng.generate(GenerationRequest("free", prompt=prompt, params=SamplingParams(max_new_tokens=8)))
        assert free.token_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # the issue's premise
        assert not free.text.startswith("<|im_start|>")  # returned text omits special tokens
        out = eng.generate(GenerationRequest("stop", prompt=prompt,
                                             params=SamplingParams(max_new_tokens=8, stop=("<|im_start|>",))))
        assert out.finish_reason == "stop" and out.text == ""
        # a stop string containing the special token plus text, matched on the text
        both = eng.generate(GenerationRequest("both", prompt=prompt,
                                              params=SamplingParams(max_new_tokens=8, stop=("<|im_start|>user",))))
        assert both.finish_reason == "stop" and both.text == ""
    finally:
        eng.stop()


# --- the kind: any stop strings over any output with any special tokens (scripted tokens, no model) -----------

_ALPHABET = [10, *range(32, 127)]  # ASCII: each byte token decodes to exactly one character


def _scripted_engine(special_ids):
    """An engine used only for its output processing (``_accept``), over the byte tokenizer with
    ``special_ids`` marked special."""
    tok = byte_tokenizer()
    if special_ids:
        tok.add_special_tokens({"additional_special_tokens": [tok.convert_ids_to_tokens(i) for i in special_ids]})
    runner = SimpleNamespace(pool=SimpleNamespace(num_blocks=2, block_size=16))  # no forward pass is run
    return Engine(model=None, tokenizer=tok, runner=runner, adapter_cache=None, config=EngineConfig(),
                  metrics=Metrics(), max_total_tokens=10_000), tok


def _oracle(ids, specials, stops, contents):
    """Finish reason and returned text, from first principles: one character per token; a token whose own text
    (``contents``) is a stop string ends at that token; else the earliest stop occurrence in the rendering with
    special tokens ends at the token where it starts; the returned text drops special tokens."""
    def visible(upto):
        return "".join(chr(t) for t in ids[:upto] if t not in specials)

    for j, t in enumerate(ids):
        if t in specials and contents[t] in stops:
            return "stop", visible(j)
        full = "".join(chr(u) for u in ids[:j + 1])
        hits = [full.find(s) for s in stops if s in full]
        if hits:
            return "stop", visible(min(hits))
    return "length", visible(len(ids))


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_stop_matching_property(data):
    """Scripted outputs, special-token subsets and stop strings (substrings of the rendering or random): the
    finish reason and the streamed text agree with :func:`_oracle`, with exactly one final event."""
    ids = data.draw(st.lists(st.sampled_from(_ALPHABET[:12] + [ord(c) for c in "ab<|>\n "]), min_size=1,
                             max_size=24), label="ids")
    specials = set(data.draw(st.lists(st.sampled_from(sorted(set(ids))), max_size=3), label="specials"))
    rendering = "".join(chr(t) for t in ids)
    stop_strategy = st.one_of(
        st.integers(0, len(ids) - 1).flatmap(lambda i: st.integers(i + 1, len(ids)).map(lambda j: rendering[i:j])),
        st.text(alphabet="ab<|>\n !\"#", min_size=1, max_size=4))
    stops = tuple(data.draw(st.lists(stop_strategy, min_size=1, max_size=3), label="stops"))
    eng, tok = _scripted_engine(sorted(specials))
    contents = {t: tok.convert_ids_to_tokens(t) for t in specials}
    params = SamplingParams(max_new_tokens=len(ids), stop=stops)
    stream = RequestStream("p", eng)
    seq = _Sequence(request=GenerationRequest("p", prompt="x", params=params), stream=stream, prompt_ids=[1],
                    arrival=time.monotonic(), label="base", seed=0,
                    output=OutputProcessor(tok, stops, eng._hidden_specials), stop_ids=eng._stop_token_ids(stops))
    for t in ids:
        eng._accept(seq, t)
        if seq.done:
            break
    events = list(stream._events.queue)
    assert sum(e.finished for e in events) == 1 and events[-1].finished
    want_reason, want_text = _oracle(ids, specials, stops, contents)
    assert (events[-1].finish_reason, "".join(e.text for e in events)) == (want_reason, want_text)
