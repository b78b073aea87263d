"""The serving engine: continuous batching with per-row steering, on tiny random models.

The reference for every row is the library's own ``generate`` of that prompt alone, with the
same steering (Hugging Face ``generate`` under the runtime's hooks): the engine must give the
same greedy tokens whatever shares its batch, whenever rows join and leave.
"""

from __future__ import annotations

import math

import pytest
import torch

from steerlab.errors import SteeringError
from steerlab.methods.caa import CAA
from steerlab.models import LoadedModel
from steerlab.runtime import Steer, steering
from steerlab.serve import Engine, EngineBusy, EngineClosed, EngineConfig, SamplingParams
from steerlab.serve.batch_cache import BatchCache, new_cache
from steerlab.serve.sampling import TextStream, choose_tokens, make_generator
from steerlab.sites import Site
from tiny_models import ARCHS, tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPTS = ["the cat sat on", "I", "in the house there was a", "we went", "he said that the"]
NEW = 7


def caa(lm: LoadedModel, layer: int = 1, seed: int = 0, scope: str = "last") -> CAA:
    c = CAA(layers=[layer], scope=scope)
    g = torch.Generator().manual_seed(seed)
    c.set_vectors({Site("resid_post", layer): torch.randn(lm.info.hidden_size, generator=g)})
    c.model_info = lm.info
    return c


def prompt_ids(lm: LoadedModel, text: str) -> list[int]:
    return list(lm.tokenizer(text, add_special_tokens=True)["input_ids"])


def reference(lm: LoadedModel, ids: list[int], steers: list[Steer], new: int = NEW) -> list[int]:
    """Greedy tokens of one prompt alone with HF generate under the runtime's steering."""
    x = torch.tensor([ids])
    kw = {"max_new_tokens": new, "do_sample": False, "temperature": None, "top_p": None,
          "top_k": None, "pad_token_id": lm.tokenizer.pad_token_id}
    with torch.no_grad(), steering(lm, steers or None):
        out = lm.model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
    gen = out[0, len(ids):].tolist()
    eos = lm.tokenizer.eos_token_id
    return gen[: gen.index(eos)] if eos in gen else gen


def run_until_done(engine: Engine, limit: int = 500) -> None:
    for _ in range(limit):
        if not engine.step():
            return
    raise AssertionError("the engine did not finish")


def steer_mix(lm: LoadedModel) -> list[list[Steer]]:
    a, b = caa(lm, 1, 0), caa(lm, 0, 1, scope="all")
    return [[], [Steer(a, 4.0)], [Steer(b, -3.0, scope="generated")],
            [Steer(a, 2.0), Steer(b, 1.5)], [Steer(a, -4.0, scope="from:-1")]]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_rows_join_and_leave_and_match_alone(arch: str) -> None:
    """Rows of different lengths, steered differently, joining at different steps and
    finishing at different lengths: each equals its prompt generated alone."""
    lm = tiny_model(arch)
    mix = steer_mix(lm)
    engine = Engine(lm, EngineConfig(max_batch=4))
    lengths = [NEW, 3, NEW, 5, NEW]
    handles = []
    for i in range(2):
        handles.append(engine.submit(prompt_ids(lm, PROMPTS[i]),
                                     SamplingParams(max_tokens=lengths[i]), mix[i]))
    engine.step()
    engine.step()
    for i in range(2, 5):  # join a running batch; the 5th waits for a free row
        handles.append(engine.submit(prompt_ids(lm, PROMPTS[i]),
                                     SamplingParams(max_tokens=lengths[i]), mix[i]))
    run_until_done(engine)
    for i, h in enumerate(handles):
        got = h.wait(0)
        want = reference(lm, prompt_ids(lm, PROMPTS[i]), mix[i], lengths[i])
        assert got.token_ids == want, (arch, i)
        assert got.finish_reason == ("length" if len(want) == lengths[i] else "stop")
    assert engine.stats()["running"] == 0


def test_unsteered_rows_are_bit_identical_to_a_plain_batch() -> None:
    """A row without controllers, batched with steered rows, gets exactly the logits of the
    same row in an unsteered batch (the runtime writes only active rows)."""
    lm = tiny_model("llama")
    c = caa(lm)
    seen: list[torch.Tensor] = []
    for steers in ([[], [Steer(c, 5.0)]], [[], []]):
        engine = Engine(lm)
        hs = [engine.submit(prompt_ids(lm, p), SamplingParams(max_tokens=4), s)
              for p, s in zip(PROMPTS[:2], steers, strict=True)]
        original = engine._forward
        logits_log: list[torch.Tensor] = []

        def spy(*args: object, _orig=original, _log=logits_log, **kw: object) -> torch.Tensor:
            out = _orig(*args, **kw)  # type: ignore[arg-type]
            _log.append(out[0].clone())
            return out

        engine._forward = spy  # type: ignore[method-assign]
        run_until_done(engine)
        assert all(h.wait(0).finish_reason for h in hs)
        seen.append(torch.stack(logits_log))
    assert torch.equal(seen[0], seen[1])


def test_seeded_sampling_does_not_depend_on_the_batch() -> None:
    lm = tiny_model("qwen2")
    params = SamplingParams(max_tokens=6, temperature=0.9, top_p=0.95, seed=11)
    alone = Engine(lm)
    h = alone.submit(prompt_ids(lm, PROMPTS[0]), params)
    run_until_done(alone)
    crowded = Engine(lm)
    others = [crowded.submit(prompt_ids(lm, p), SamplingParams(max_tokens=6, temperature=1.0,
                                                               seed=k))
              for k, p in enumerate(PROMPTS[1:])]
    h2 = crowded.submit(prompt_ids(lm, PROMPTS[0]), params)
    run_until_done(crowded)
    assert h.wait(0).token_ids == h2.wait(0).token_ids
    assert all(o.wait(0).finish_reason in ("stop", "length") for o in others)


def test_cancel_drops_the_row_at_the_next_step() -> None:
    lm = tiny_model("llama")
    engine = Engine(lm)
    keep = engine.submit(prompt_ids(lm, PROMPTS[0]), SamplingParams(max_tokens=NEW,
                                                                    ignore_eos=True))
    gone = engine.submit(prompt_ids(lm, PROMPTS[2]), SamplingParams(max_tokens=50,
                                                                    ignore_eos=True))
    queued = engine.submit(prompt_ids(lm, PROMPTS[1]), SamplingParams(max_tokens=5))
    queued.cancel()  # cancelled before admission: never pre-filled
    engine.step()
    gone.cancel()
    engine.step()
    assert engine.stats()["running"] == 1
    run_until_done(engine)
    assert gone.wait(0).finish_reason == "cancelled"
    assert queued.wait(0).finish_reason == "cancelled"
    got = keep.wait(0)
    assert got.finish_reason == "length" and len(got.token_ids) == NEW
    assert engine.counters["cancelled"] == 2
    assert engine.counters["prefills"] == 1


def test_bounded_queue_and_closed_engine() -> None:
    lm = tiny_model("llama")
    engine = Engine(lm, EngineConfig(max_batch=1, max_queue=2))
    ids = prompt_ids(lm, PROMPTS[0])
    engine.submit(ids, SamplingParams(max_tokens=2))
    engine.submit(ids, SamplingParams(max_tokens=2))
    with pytest.raises(EngineBusy, match="capacity"):
        engine.submit(ids, SamplingParams(max_tokens=2))
    assert engine.counters["rejected"] == 1
    engine.start()
    engine.close()
    with pytest.raises(EngineClosed):
        engine.submit(ids, SamplingParams(max_tokens=2))


def test_threaded_engine_serves_concurrent_submissions() -> None:
    lm = tiny_model("gpt2")
    mix = steer_mix(lm)
    with Engine(lm, EngineConfig(max_batch=3)) as engine:
        hs = [engine.submit(prompt_ids(lm, p), SamplingParams(max_tokens=NEW), mix[i])
              for i, p in enumerate(PROMPTS)]
        got = [h.wait(60) for h in hs]
    for i, g in enumerate(got):
        assert g.token_ids == reference(lm, prompt_ids(lm, PROMPTS[i]), mix[i])
        assert g.first_token_s <= g.total_s


def test_non_finite_logits_fail_that_row_only() -> None:
    lm = tiny_model("llama")
    c = caa(lm, 1, 0, scope="all")
    engine = Engine(lm)
    bad = engine.submit(prompt_ids(lm, PROMPTS[0]), SamplingParams(max_tokens=4),
                        [Steer(c, 3e38)])
    good = engine.submit(prompt_ids(lm, PROMPTS[1]), SamplingParams(max_tokens=4))
    run_until_done(engine)
    b = bad.wait(0)
    assert b.finish_reason == "error" and "non-finite" in (b.error or "")
    assert good.wait(0).token_ids == reference(lm, prompt_ids(lm, PROMPTS[1]), [], 4)


def test_invalid_requests_are_refused_at_submission() -> None:
    lm = tiny_model("llama")
    engine = Engine(lm)
    with pytest.raises(SteeringError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(SteeringError, match="vocabulary"):
        engine.submit([10**6], SamplingParams())
    with pytest.raises(SteeringError, match="context"):
        engine.submit([5] * 200, SamplingParams(max_tokens=100))
    wrong = CAA(layers=[1])
    wrong.set_vectors({Site("resid_post", 1): torch.randn(48)})
    wrong.model_info = type(lm.info)("elsewhere", "X", 48, 2, False)
    with pytest.raises(SteeringError, match="hidden size"):
        engine.submit([5, 6], SamplingParams(), [Steer(wrong, 1.0)])
    deep = CAA(layers=[7])
    deep.set_vectors({Site("resid_post", 7): torch.randn(32)})
    with pytest.raises(Exception, match="7"):
        engine.submit([5, 6], SamplingParams(), [Steer(deep, 1.0)])
    with pytest.raises(SteeringError, match="scope"):
        engine.submit([5, 6], SamplingParams(), [Steer(caa(lm), 1.0, scope="sideways")])
    for bad in ({"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0},
                {"temperature": math.nan}, {"stop": ("",)}):
        with pytest.raises(SteeringError):
            SamplingParams(**bad)  # type: ignore[arg-type]


def test_batch_cache_join_select_trim() -> None:
    def cache_with(rows: int, length: int, fill: float) -> BatchCache:
        c = new_cache()
        k = torch.full((rows, 2, length, 4), fill)
        c.update(k, k.clone(), 0)
        return BatchCache(c, torch.ones(rows, length, dtype=torch.long))

    a = cache_with(2, 3, 1.0)
    b = cache_with(1, 5, 2.0)
    a.extend(b)
    assert a.rows == 3 and a.length == 5
    assert a.mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    keys = a.cache.layers[0].keys
    assert torch.equal(keys[0, :, :2], torch.zeros(2, 2, 4))
    assert torch.equal(keys[2], torch.full((2, 5, 4), 2.0))
    a.select([0, 1])  # the long row leaves: two all-padding columns go
    assert a.length == 3 and a.mask.tolist() == [[1, 1, 1], [1, 1, 1]]
    assert torch.equal(a.cache.layers[0].keys, torch.ones(2, 2, 3, 4))
    a.append_step()
    assert a.next_positions().tolist() == [[3], [3]]
    a.select([])
    assert a.rows == 0


def test_sampling_helpers() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0], [math.nan, 0.0, 0.0]])
    greedy = SamplingParams()
    nucleus = SamplingParams(temperature=1.0, top_p=1e-6)  # only the top token survives
    out = choose_tokens(logits, [greedy, nucleus, greedy],
                        [None, make_generator(0), None])
    assert out == [1, 0, None]
    g1, g2 = make_generator(5), make_generator(5)
    p = SamplingParams(temperature=1.0, seed=5)
    flat = torch.zeros(1, 50)
    draws = [[choose_tokens(flat, [p], [g]) for _ in range(5)] for g in (g1, g2)]
    assert draws[0] == draws[1]


class _CharTokenizer:
    """Token i is chr(i); a token 0xFFFD stands for half a character (decoded as U+FFFD)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_stop_prefixes_and_cuts_at_stops() -> None:
    s = TextStream(_CharTokenizer(), stop=("END",))
    out = [s.push(ord(c)) for c in "abcEN"]
    assert "".join(out) == "abc"  # "EN" could be the start of "END"
    assert s.push(ord("X")) == "ENX"
    assert s.push(ord("E")) == "" and s.push(ord("N")) == ""
    assert s.push(ord("D")) == "" and s.stopped
    assert s.text == "abcENX"
    t = TextStream(_CharTokenizer())
    assert t.push(ord("a")) == "a"
    assert t.push(0xFFFD) == ""  # an incomplete character waits
    assert t.push(ord("b")) == "\ufffdb"
    u = TextStream(_CharTokenizer(), stop=("xy",))
    for c in "abx":
        u.push(ord(c))
    assert u.text == "ab"
    assert u.finish() == "x" and u.text == "abx"


class Boom(CAA):
    """A CAA whose steering raises: a controller bug must fail its own request only."""

    def steer(self, site, h, strength, ctx):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")


def test_a_failing_prefill_fails_only_its_request() -> None:
    lm = tiny_model("llama")
    engine = Engine(lm)
    good = engine.submit(prompt_ids(lm, PROMPTS[0]), SamplingParams(max_tokens=NEW))
    engine.step()
    boom = Boom(layers=[1])
    boom.set_vectors({Site("resid_post", 1): torch.zeros(lm.info.hidden_size)})
    bad = engine.submit(prompt_ids(lm, PROMPTS[2]), SamplingParams(max_tokens=NEW),
                        [Steer(boom, 1.0)])
    run_until_done(engine)
    b = bad.wait(0)
    assert b.finish_reason == "error" and "boom" in (b.error or "")
    assert good.wait(0).token_ids == reference(lm, prompt_ids(lm, PROMPTS[0]), [])
    assert engine.counters["failed"] == 1


def test_a_group_prefill_failure_is_retried_row_by_row() -> None:
    """A failing request pre-filled together with a good one fails alone: the group is
    retried one request at a time."""
    lm = tiny_model("llama")
    engine = Engine(lm)
    boom = Boom(layers=[1])
    boom.set_vectors({Site("resid_post", 1): torch.zeros(lm.info.hidden_size)})
    good = engine.submit(prompt_ids(lm, PROMPTS[0]), SamplingParams(max_tokens=NEW))
    bad = engine.submit(prompt_ids(lm, PROMPTS[2]), SamplingParams(max_tokens=NEW),
                        [Steer(boom, 1.0)])
    run_until_done(engine)  # both admitted in the same step
    assert bad.wait(0).finish_reason == "error"
    assert good.wait(0).token_ids == reference(lm, prompt_ids(lm, PROMPTS[0]), [])


def test_cancelled_waiting_requests_free_their_queue_place() -> None:
    lm = tiny_model("llama")
    engine = Engine(lm, EngineConfig(max_batch=1, max_queue=1))
    ids = prompt_ids(lm, PROMPTS[0])
    engine.submit(ids, SamplingParams(max_tokens=3))
    engine.step()  # running
    gone = engine.submit(ids, SamplingParams(max_tokens=3))  # waiting: the queue is full
    gone.cancel()
    kept = engine.submit(ids, SamplingParams(max_tokens=3))  # takes the freed place
    assert gone.wait(0).finish_reason == "cancelled"
    run_until_done(engine)
    assert kept.wait(0).finish_reason == "length"


def test_an_unexpected_failure_ends_the_running_rows_and_the_engine_goes_on() -> None:
    lm = tiny_model("llama")
    with Engine(lm) as engine:
        original = engine._drop_cancelled
        calls = {"n": 0}

        def flaky() -> None:
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("out of memory, say")
            original()

        engine._drop_cancelled = flaky  # type: ignore[method-assign]
        first = engine.submit(prompt_ids(lm, PROMPTS[0]), SamplingParams(max_tokens=20,
                                                                         ignore_eos=True))
        got = first.wait(30)
        assert got.finish_reason == "error" and "out of memory" in (got.error or "")
        again = engine.submit(prompt_ids(lm, PROMPTS[1]), SamplingParams(max_tokens=4))
        assert again.wait(30).token_ids == reference(lm, prompt_ids(lm, PROMPTS[1]), [], 4)
        assert engine.running


def test_tiny_temperatures_decode_greedily() -> None:
    assert SamplingParams(temperature=1e-9).greedy
    assert not SamplingParams(temperature=0.01).greedy


class _Accents(_CharTokenizer):
    """Like _CharTokenizer, but tokens 1000 + 1001 together are "é" (1000 alone is half of
    it, decoded as U+FFFD), as byte-level tokenizers split multi-byte characters."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out, i = [], 0
        while i < len(ids):
            if ids[i] == 1000:
                done = i + 1 < len(ids) and ids[i + 1] == 1001
                out.append("é" if done else "\ufffd")
                i += 2 if done else 1
            else:
                out.append(chr(ids[i]))
                i += 1
        return "".join(out)


def test_non_ascii_stop_strings_do_not_leak() -> None:
    s = TextStream(_Accents(), stop=("aé",))
    assert s.push(ord("x")) == "x"
    assert s.push(ord("a")) == ""  # could start "aé"
    assert s.push(1000) == ""  # half of é: "a" still held
    assert s.push(1001) == "" and s.stopped
    assert s.text == "x"
    t = TextStream(_Accents(), stop=("aé",))
    released = [t.push(token) for token in (ord("a"), 1000, ord("b"))]  # a lone half "é"
    assert released == ["", "", "a\ufffdb"] and not t.stopped
    assert t.finish() == ""


def test_spid_state_is_carried_per_request() -> None:
    """S-PID carries each row's last-block error into its next forward pass: the engine,
    which runs every step in its own steering context, keeps that state per request, so
    rows joining a running batch and leaving it each equal their prompt generated alone."""
    from steerlab.methods import SPID

    lm = tiny_model("llama")
    c = SPID(kp=0.5, ki=0.3, kd=0.8)
    g = torch.Generator().manual_seed(7)
    v = torch.randn(1, lm.info.num_layers, lm.info.hidden_size, generator=g)
    c.set_setpoint(v / v.norm(dim=-1, keepdim=True), torch.rand(1, lm.info.num_layers,
                                                                generator=g) * 3 + 1)
    c.model_info = lm.info
    mix = [[Steer(c, 2.0)], [], [Steer(c, -1.5)], [Steer(c, 1.0)]]
    engine = Engine(lm, EngineConfig(max_batch=4))
    handles = [engine.submit(prompt_ids(lm, PROMPTS[i]), SamplingParams(max_tokens=NEW),
                             mix[i]) for i in range(2)]
    engine.step()
    engine.step()
    handles += [engine.submit(prompt_ids(lm, PROMPTS[i]), SamplingParams(max_tokens=NEW),
                              mix[i]) for i in range(2, 4)]
    run_until_done(engine)
    for i, h in enumerate(handles):
        assert h.wait(0).token_ids == reference(lm, prompt_ids(lm, PROMPTS[i]), mix[i]), i
    # and the carried state matters: with the rows' carry dropped, steered rows differ
    engine = Engine(lm, EngineConfig(max_batch=4))
    lost = [engine.submit(prompt_ids(lm, PROMPTS[i]), SamplingParams(max_tokens=NEW), mix[i])
            for i in (0, 2)]
    for _ in range(200):
        for r in engine._active:
            r.carry.clear()
        if not engine.step():
            break
    got = [h.wait(0).token_ids for h in lost]
    assert got != [reference(lm, prompt_ids(lm, PROMPTS[i]), mix[i]) for i in (0, 2)]
