"""Stop strings in a stream never leak, even split across chunks."""

from __future__ import annotations

import random

from localchat.engine.stops import StopFilter


def run(chunks: list[str], stops: tuple[str, ...]) -> tuple[str, bool]:
    f = StopFilter(stops)
    out = "".join(f.feed(c) for c in chunks) + f.flush()
    return out, f.stopped


def test_stop_split_across_chunks() -> None:
    assert run(["Hello <|im", "_end|> ignored"], ("<|im_end|>",)) == ("Hello ", True)


def test_partial_match_is_released_when_it_is_not_a_stop() -> None:
    assert run(["a <|i", "nfo|> b"], ("<|im_end|>",)) == ("a <|info|> b", False)


def test_held_text_flushed_at_end() -> None:
    assert run(["ends with USER"], ("USER:",)) == ("ends with USER", False)


def test_random_chunking_matches_whole_text() -> None:
    rng = random.Random(0)
    text = "The answer is 42.\nUSER: next question"
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 8)))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert run(chunks, ("USER:", "</s>")) == ("The answer is 42.\n", True)
