"""The continuous-batching engine on a tiny NF4 model: batching invariance, adapters, stops, limits, cancellation."""

from __future__ import annotations

import shutil
import time

import pytest

from server.engine.types import ChatMessage, GenerationRequest, SamplingParams
from server.errors import Cancelled, DeadlineExceeded, InvalidArgument, NotFound, ResourceExhausted
from tests.engine_harness import build_engine
from tests.tiny import make_adapter, save_tiny_base

ADAPTERS = {
    "alpha": dict(seed=11, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "beta": dict(seed=12, r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]),
    "gamma": dict(seed=13, r=16, lora_alpha=8, use_rslora=True, target_modules=["down_proj", "up_proj"]),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    base_dir = save_tiny_base(root)
    return base_dir, {name: make_adapter(base_dir, root / f"src-{name}", **kw) for name, kw in ADAPTERS.items()}


def build(tmp_path, files, start=True, **engine_kw):
    """A fresh engine over its own store in ``tmp_path`` with every adapter registered."""
    return build_engine(tmp_path, *files, start=start, **engine_kw)


def req(rid, adapter="", prompt="hello there", **params):
    return GenerationRequest(request_id=rid, adapter_id=adapter, prompt=prompt,
                             params=SamplingParams(**{"max_new_tokens": 12, **params}))


@pytest.fixture
def engine(tmp_path, files):
    eng, store, metrics = build(tmp_path, files)
    yield eng
    eng.stop()


MIX = [("", "hello there"), ("alpha", "hello there"), ("beta", "a longer prompt, to pad others"),
       ("gamma", "hi"), ("", "zz"), ("beta", "hello there")]


def test_mixed_batch_equals_each_request_alone(engine):
    alone = [engine.generate(req(f"solo{i}", a, p)) for i, (a, p) in enumerate(MIX)]
    streams = [engine.submit(req(f"mix{i}", a, p)) for i, (a, p) in enumerate(MIX)]
    together = [s.result() for s in streams]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert all(r.completion_tokens == len(r.token_ids) for r in together)
    # Same prompt, different adapters (and the base) give different continuations.
    same_prompt = {a: r.token_ids for (a, p), r in zip(MIX, together) if p == "hello there"}
    assert len(set(same_prompt.values())) == len(same_prompt) == 3


def test_stream_pieces_add_up_to_the_answer(engine):
    events = list(engine.submit(req("s", "beta", max_new_tokens=10)))
    assert events[-1].finished and events[-1].finish_reason == "length"
    assert events[-1].completion_tokens == 10
    full = engine.generate(req("full", "beta", max_new_tokens=10))
    assert "".join(e.text for e in events) == full.text
    assert sum(len(e.token_ids) for e in events) == 10


def test_stop_string_cuts_text(engine):
    full = engine.generate(req("a", "alpha", max_new_tokens=16))
    assert len(full.text) >= 6
    # a piece of the output from its 4th character on, without U+FFFD (refused in stop strings: the decoder's
    # placeholder for an incomplete character)
    stop = next(full.text[i:i + 2] for i in range(3, len(full.text) - 1) if "\ufffd" not in full.text[i:i + 2])
    first = full.text.find(stop)
    cut = engine.generate(req("b", "alpha", max_new_tokens=16, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:first]


def test_eos_ends_generation(engine):
    first = engine.generate(req("a", max_new_tokens=1)).token_ids[0]
    engine.eos_ids = {first}
    out = engine.generate(req("b", max_new_tokens=5))
    assert out.finish_reason == "eos" and out.completion_tokens == 0 and out.text == ""


def test_seeded_sampling_ignores_batch_neighbours(engine):
    sampled = dict(temperature=0.9, top_p=0.95, top_k=40, repetition_penalty=1.2, seed=7)
    alone = engine.generate(req("x", "gamma", **sampled))
    streams = [engine.submit(req(f"n{i}", a, p)) for i, (a, p) in enumerate(MIX[:3])]
    again = engine.submit(req("y", "gamma", **sampled))
    assert again.result().token_ids == alone.token_ids
    for s in streams:
        s.result()
    other_seed = engine.generate(req("z", "gamma", **{**sampled, "seed": 8}))
    assert other_seed.token_ids != alone.token_ids


def test_unknown_adapter_is_not_found(engine):
    with pytest.raises(NotFound) as err:
        engine.submit(req("u", "nope"))
    assert err.value.field == "adapter_id"


@pytest.mark.parametrize("params,field", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(stop=("",)), "stop"),
])
def test_bad_sampling_names_field(engine, params, field):
    with pytest.raises(InvalidArgument) as err:
        engine.submit(req("bad", **params))
    assert err.value.field == field


def test_prompt_and_messages_exclusive(engine):
    with pytest.raises(InvalidArgument):
        engine.submit(GenerationRequest(request_id="b", prompt="x", messages=(ChatMessage("user", "y"),)))
    with pytest.raises(InvalidArgument):
        engine.submit(GenerationRequest(request_id="c"))
    chat = engine.generate(GenerationRequest(request_id="d", messages=(ChatMessage("user", "hey"),),
                                             params=SamplingParams(max_new_tokens=3)))
    assert chat.prompt_tokens == len("<user>hey\n<assistant>")


def test_prompt_over_context_is_resource_exhausted(engine):
    with pytest.raises(ResourceExhausted) as err:
        engine.submit(req("long", prompt="x" * 200))
    assert err.value.field == "prompt"
    near = engine.generate(req("near", prompt="x" * 120, max_new_tokens=50))
    assert near.finish_reason == "length" and near.prompt_tokens + near.completion_tokens == 128


def test_queue_full(tmp_path, files):
    eng, _, _ = build(tmp_path, files, start=False, max_queue=2)
    eng.submit(req("1"))
    eng.submit(req("2"))
    with pytest.raises(ResourceExhausted):
        eng.submit(req("3"))
    eng.start()
    eng.stop()


def test_cancel_and_deadline(engine):
    stream = engine.submit(req("c", "beta", max_new_tokens=100))
    it = iter(stream)
    next(it)
    stream.cancel()
    with pytest.raises(Cancelled):
        for _ in it:
            pass
    late = GenerationRequest(request_id="d", prompt="hi", params=SamplingParams(max_new_tokens=100),
                             deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded):
        engine.generate(late)
    assert engine.generate(req("after", max_new_tokens=2)).completion_tokens == 2  # still serving
    # The final event reaches the caller just before the loop drops the row; wait (bounded) for that.
    for _ in range(200):
        if engine.counts() == (0, 0):
            break
        time.sleep(0.01)
    assert engine.counts() == (0, 0)


def test_more_adapters_than_slots(tmp_path, files):
    """Three adapters through one accelerator slot: requests wait for the slot and still get their adapter."""
    ref_engine, _, _ = build(tmp_path / "ref", files)
    want = {a: ref_engine.generate(req(f"r{a}", a)).token_ids for a in ADAPTERS}
    ref_engine.stop()
    eng, _, metrics = build(tmp_path / "small", files, adapter_slots=1, cpu_adapter_cache=1)
    try:
        streams = {a: eng.submit(req(f"s{a}", a)) for a in ADAPTERS}
        got = {a: s.result().token_ids for a, s in streams.items()}
        assert got == want
        loads = metrics.registry.get_sample_value("qlora_server_adapter_loads_total", {"tier": "gpu"})
        evictions = metrics.registry.get_sample_value("qlora_server_adapter_evictions_total", {"tier": "gpu"})
        assert loads == 3 and evictions == 2
    finally:
        eng.stop()


def test_replaced_adapter_never_serves_old_weights(tmp_path, files):
    eng, store, _ = build(tmp_path, files)
    try:
        before = eng.generate(req("1", "alpha")).token_ids
        beta_like = eng.generate(req("2", "beta")).token_ids
        staged = tmp_path / "new-alpha"
        shutil.copytree(files[1]["beta"], staged)
        store.register("alpha", staged, replace=True)
        after = eng.generate(req("3", "alpha")).token_ids
        assert after == beta_like != before
        store.unregister("alpha")
        with pytest.raises(NotFound):
            eng.submit(req("4", "alpha"))
    finally:
        eng.stop()


def test_replace_with_identical_files_keeps_serving(tmp_path, files):
    """Re-registering the same weights (same sha256) with replace must not strand the adapter."""
    eng, store, _ = build(tmp_path, files)
    try:
        before = eng.generate(req("1", "gamma")).token_ids
        store.register("gamma", files[1]["gamma"], replace=True)
        assert eng.generate(req("2", "gamma")).token_ids == before
    finally:
        eng.stop()
