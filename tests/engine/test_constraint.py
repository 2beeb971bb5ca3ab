"""Constrained decoding in the engine (engine/constraint.py) on random weights: the committed text follows the
grammar, the document closes within max_tokens and ends the reply, and rows batched beside it are unchanged."""

from __future__ import annotations

import json

import jsonschema
import pytest

from engine.request import BlockCommitted, Finished, FinishReason, Request, SamplingParams
from server.structured import Grammars
from server.text import Tokenizer
from tests.engine.test_engine import output_tokens, prompt

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
    "required": ["id", "tags"],
}


@pytest.fixture(scope="module")
def grammars(engine, tiny_checkpoint) -> tuple[Grammars, Tokenizer]:
    tokenizer = Tokenizer(tiny_checkpoint)
    return Grammars(tokenizer.hf, engine.info.vocab_size, engine.info.stop_token_ids), tokenizer


@pytest.mark.parametrize("max_tokens", [20, 100])  # 20: the closing reserve from the first canvas on (C = 32)
def test_the_reply_is_a_whole_valid_document_and_neighbours_are_unchanged(engine, grammars, max_tokens):
    grammars, tokenizer = grammars
    params = SamplingParams(max_tokens=max_tokens, steps=3, seed=1)
    free = SamplingParams(max_tokens=64, steps=3, seed=2)
    alone = output_tokens(engine.generate({"free": (prompt(9, 2), free)})["free"])
    constraint = grammars.constraint(grammars.json_schema(SCHEMA, "schema"), max_tokens)
    engine.add_request(Request("json", tuple(prompt(7, 1)), params, constraint))
    engine.add_request(Request("free", tuple(prompt(9, 2)), free))
    events = {"json": [], "free": []}
    while engine.has_unfinished():
        for event in engine.step()[0]:
            events[event.request_id].append(event)
    ids = [t for e in events["json"] if isinstance(e, BlockCommitted) for t in e.token_ids]
    jsonschema.validate(json.loads(tokenizer.decode(ids)), SCHEMA)
    assert len(ids) <= max_tokens
    assert events["json"][-1] == Finished("json", FinishReason.STOP, events["json"][-1].usage, events["json"][-1].time)
    assert output_tokens(events["free"]) == alone  # batch-invariant: the constrained row changed nothing beside it


def test_the_walk_keeps_allowed_argmax_and_repairs_the_rest(grammars):
    grammars, tokenizer = grammars
    constraint = grammars.constraint(grammars.json_schema({"type": "object"}, "schema"), 200)
    good = tokenizer.encode('{"a":"b')
    bad = tokenizer.encode(" <x")  # allowed inside the open string
    canvas = [*good, *bad, 1, 1, *tokenizer.encode("}")]
    candidates = [[t] for t in canvas]
    candidates[len(good) + len(bad)] = [1, *tokenizer.encode('"')]  # <eos> refused mid-string: its next candidate
    tokens, complete = constraint.commit(canvas, candidates, budget=200)
    closed = tokenizer.encode('"')
    # The argmax is kept while allowed, a refused position takes its best allowed candidate, the next refused one (no
    # allowed candidate) a grammar-chosen token, and the canvas ends where the document does.
    assert tokens == [*good, *bad, *closed, *tokenizer.encode("}")] and complete
    assert json.loads(tokenizer.decode(tokens)) == {"a": "b <x"}
