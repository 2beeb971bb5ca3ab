"""Prefix caching (engine/prefix_cache.py): a request served from cached pages gives the same tokens, bit for bit, as
the same request served cold, on the tiny config and on the real structure (30 layers 5:1, 128 experts top-8, the
real head geometry and vocabulary) with the window scaled to the page as the real one is (W - 1 = 1023 spans 4 pages
of 256, here 127 spans 4 of 32); pages are shared by content and salt, evicted only when no sequence holds them."""

from __future__ import annotations

import json

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.kv_cache import KVLayout
from engine.prefix_cache import PrefixCache
from engine.request import Finished, Request, SamplingParams
from models.config import load_config
from models.random_checkpoint import write_random_checkpoint
from tests.engine.test_engine import assert_same_tokens, cached, output_tokens

MiB = 2**20


@pytest.fixture(scope="module")
def structure_checkpoint(tmp_path_factory):
    out = write_random_checkpoint(tmp_path_factory.mktemp("structure"), "structure", seed=3, dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    config["canvas_length"], config["text_config"]["sliding_window"] = 32, 128
    (out / "config.json").write_text(json.dumps(config))
    return out


def engine_pair(checkpoint, **kwargs) -> tuple[Engine, Engine]:
    """(cached, cold) engines of one checkpoint."""
    make = lambda caching: Engine(  # noqa: E731
        EngineConfig(str(checkpoint), max_num_seqs=4, enable_prefix_caching=caching, **kwargs)
    )
    return make(True), make(False)


@pytest.fixture(scope="module", params=["tiny", "structure"])
def engines(request, tiny_checkpoint, structure_checkpoint):
    checkpoint = {"tiny": tiny_checkpoint, "structure": structure_checkpoint}[request.param]
    return engine_pair(checkpoint, kv_budget_bytes=(64 if request.param == "tiny" else 1536) * MiB)


def tokens_of(vocab: int, length: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def params(canvas: int, **kwargs) -> SamplingParams:
    return SamplingParams(**{"max_tokens": canvas, "steps": 2, "seed": 5, "stop_token_ids": (), **kwargs})


def run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams, str | None]]) -> dict:
    """Run requests to completion together: {id: (output tokens, cached_tokens)}."""
    for rid, (ids, p, salt) in requests.items():
        engine.add_request(Request(rid, tuple(ids), p, cache_salt=salt))
    events = {rid: [] for rid in requests}
    while engine.has_unfinished():
        for event in engine.step()[0]:
            events[event.request_id].append(event)
    finished = {rid: next(e for e in evs if isinstance(e, Finished)) for rid, evs in events.items()}
    return {rid: (output_tokens(events[rid]), finished[rid].usage.cached_tokens) for rid in requests}


def one(engine: Engine, ids: list[int], p: SamplingParams, salt: str | None = None) -> tuple[list[int], int]:
    return run(engine, {"r": (ids, p, salt)})["r"]


def shapes(engine: Engine) -> tuple[int, int, int]:
    """(page, window, vocab): prompts are sized in these so that each case means the same on every checkpoint."""
    return engine.info.kv_page_tokens, engine.model_config.sliding_window - 1, engine.info.vocab_size


@pytest.mark.parametrize("case", ["under_a_page", "one_page", "past_the_window", "hit_inside_the_window"])
def test_a_cached_prefix_gives_the_cold_tokens(engines, case):
    warm, cold = engines
    p, window, vocab = shapes(warm)
    length = {
        "under_a_page": p // 2 + 3,
        "one_page": p,  # the whole prompt is cached: nothing is encoded
        "past_the_window": (window // p + 2) * p + 5,  # the hit's sliding state is its last W - 1 tokens
        "hit_inside_the_window": p + 7,  # the hit is shorter than the window: every token of it is held
    }[case]
    if case == "hit_inside_the_window" and p >= window:
        pytest.skip("the window fits in a page: every hit ends past it")
    ids = tokens_of(vocab, length, seed=length)
    writer = ids + tokens_of(vocab, p + 3, seed=99)  # another request, with the same prefix, writes the pages
    one(warm, writer, params(p))
    tokens, hit = one(warm, ids, params(p))
    assert hit == length // p * p
    expected, none = one(cold, ids, params(p))
    assert none == 0
    assert_same_tokens(tokens, expected, f"{case}: cached vs cold")


def test_cached_prefixes_batched_beside_other_requests_give_the_cold_tokens(engines):
    warm, cold = engines
    p, window, vocab = shapes(warm)
    shared = tokens_of(vocab, window + 4 * p, seed=1)
    one(warm, [*shared, 7, 8, 9], params(p))
    requests = {f"r{i}": (shared[: (i + 2) * p] + tokens_of(vocab, 5 + i, seed=i), params(p, seed=i), None)
                for i in (0, 2)}  # fmt: skip
    requests["other"] = (tokens_of(vocab, 2 * p + 3, seed=50), params(p), None)
    together = run(warm, requests)
    assert [together[f"r{i}"][1] for i in (0, 2)] == [2 * p, 4 * p]
    for rid, (ids, params_, _) in requests.items():
        expected, _ = one(cold, ids, params_)
        assert_same_tokens(together[rid][0], expected, f"{rid}: batched and cached vs alone and cold")


def test_committed_canvases_are_cached_for_the_next_turn(tiny_checkpoint):
    """Turn 2 resends turn 1's prompt and reply: the reply's committed (encoded) canvases are hit too."""
    warm, cold = engine_pair(tiny_checkpoint, kv_budget_bytes=64 * MiB)
    p, _, vocab = shapes(warm)
    turn1 = tokens_of(vocab, 2 * p + 9, seed=4)
    reply, hit = one(warm, turn1, params(p, max_tokens=3 * p, steps=3))
    assert hit == 0 and len(reply) == 3 * p
    turn2 = turn1 + reply + tokens_of(vocab, 11, seed=5)
    tokens, hit = one(warm, turn2, params(p))
    # The prompt and the first two canvases were encoded; the last canvas never is (spec 6.2).
    assert hit == (len(turn1) + 2 * p) // p * p
    assert_same_tokens(tokens, one(cold, turn2, params(p))[0], "turn 2 cached vs cold")


def test_pages_written_by_a_chunked_prefill_are_the_bytes_a_cold_prefill_writes(tiny_checkpoint):
    chunked = Engine(EngineConfig(str(tiny_checkpoint), kv_budget_bytes=64 * MiB, prefill_chunk=16))
    cold = Engine(EngineConfig(str(tiny_checkpoint), kv_budget_bytes=64 * MiB, enable_prefix_caching=False))
    p, _, vocab = shapes(chunked)
    ids = tokens_of(vocab, 3 * p + 10, seed=8)
    one(chunked, ids[: 3 * p] + [5] * 7, params(p))  # written in chunks of 16
    slow = params(p, steps=40, stability_threshold=41)  # no commit while the cache is compared
    kv = []
    for engine in (chunked, cold):
        engine.add_request(Request("read", tuple(ids), slow))
        engine.step()
        seq = engine.scheduler.running[0]
        assert not seq.to_encode and seq.num_cached == (3 * p if engine is chunked else 0)
        kv.append(cached(engine, seq))
        engine.abort("read")
        engine.step()
    for layer, (ours, theirs) in enumerate(zip(*kv, strict=True)):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True)), f"layer {layer}"


def test_a_salt_separates_tenants(tiny_checkpoint):
    warm, _ = engine_pair(tiny_checkpoint, kv_budget_bytes=64 * MiB)
    p, _, vocab = shapes(warm)
    ids = tokens_of(vocab, 2 * p + 5, seed=6)
    one(warm, ids, params(p), salt="tenant-a")
    assert one(warm, ids, params(p), salt="tenant-b")[1] == 0
    assert one(warm, ids, params(p))[1] == 0  # no salt is a tenant of its own
    assert one(warm, ids, params(p), salt="tenant-a")[1] == 2 * p


def test_the_key_holds_the_tokens_so_equal_hashes_do_not_collide():
    cache = PrefixCache(page_size=1, window=4, num_sliding_pages=2)
    assert hash((None, (-1,))) == hash((None, (-2,)))  # CPython: hash(-1) == hash(-2)
    cache.register(None, [-1], page=1, sliding=cache.take_sliding())
    assert [b.page for b in cache.match([-1], None)] == [1]
    assert cache.match([-2], None) == []


def test_sharing_requests_survive_one_aborting(tiny_checkpoint):
    warm, cold = engine_pair(tiny_checkpoint, kv_budget_bytes=64 * MiB)
    p, _, vocab = shapes(warm)
    shared = tokens_of(vocab, 3 * p, seed=9)
    one(warm, shared, params(p))
    for rid, seed in (("a", 1), ("b", 2)):
        warm.add_request(Request(rid, tuple(shared + [seed + 3] * 4), params(p, steps=6)))
    warm.step()
    pages = [s.pages[:3] for s in warm.scheduler.running]
    assert pages[0] == pages[1]  # both hold the cached pages
    warm.abort("a")
    events = []
    while warm.has_unfinished():
        events += [e for e in warm.step()[0] if e.request_id == "b"]
    expected, _ = one(cold, shared + [5] * 4, params(p, steps=6))
    assert_same_tokens(output_tokens(events), expected, "b after a aborted")
    assert warm.scheduler.budget.num_used == 0
    assert all(block.refs == 0 for block in warm.scheduler.cache.blocks.values())


def test_eviction_under_a_small_budget_keeps_pages_in_use_and_outputs_exact(tiny_checkpoint):
    """A pool of 16 pages, 6 per request: new prompts evict cached pages no one holds, least recently used first,
    never the pages a running request holds."""
    layout = KVLayout.of(load_config(str(tiny_checkpoint))[0], torch.float32)
    assert layout.page_bytes == layout.sliding_page_bytes  # 20 pages' bytes: 16 pages, the store 4 (a fifth)
    warm, cold = engine_pair(tiny_checkpoint, kv_budget_bytes=4 * layout.slot_bytes + 20 * layout.page_bytes)
    assert warm.info.kv_num_pages == 16
    p, _, vocab = shapes(warm)
    held = tokens_of(vocab, 3 * p, seed=20)
    one(warm, held + [9] * 3, params(p))
    # A long-running request holds the 3 cached pages while four others fill and overflow the pool.
    requests = {"held": (held + [4] * 3, params(p, steps=30, stability_threshold=31), None)}
    requests |= {f"o{i}": (tokens_of(vocab, 3 * p + 2, seed=30 + i), params(p), None) for i in range(4)}
    for rid, (ids, params_, _) in requests.items():
        warm.add_request(Request(rid, tuple(ids), params_))
    events, evictions = {rid: [] for rid in requests}, 0
    while warm.has_unfinished():
        step_events, stats = warm.step()
        evictions += stats.prefix_evictions
        for event in step_events:
            events[event.request_id].append(event)
    assert evictions > 0
    for rid, (ids, params_, _) in requests.items():
        assert_same_tokens(output_tokens(events[rid]), one(cold, ids, params_)[0], f"{rid} under eviction")
    assert warm.scheduler.budget.num_used == 0


def test_reference_mode_encodes_every_prompt_whole(tiny_checkpoint):
    """generate() encodes each prompt whole, in the reference's exact shapes: reference mode caches nothing."""
    ref = Engine(EngineConfig(str(tiny_checkpoint), kv_budget_bytes=64 * MiB, reference_mode=True, max_num_seqs=1))
    assert not ref.info.prefix_caching
    ids = tokens_of(ref.info.vocab_size, 2 * ref.info.kv_page_tokens + 3, seed=2)
    first, second = (one(ref, ids, params(ref.info.kv_page_tokens)) for _ in range(2))
    assert first == second and second[1] == 0
