"""The request sets of bench_peer.py's suites beyond P1-P3 (`--suite memory`, `--suite grid`).

  P4       memory-bound: many short requests and a few long ones sent together (contexts up to 16k), the
           same KV budget on both sides (--kv-gib)
  P5       shared prefixes: each task's requests share a few hundred tokens of text after the soft prompt
           (a few-shot template), 8 tasks, 32 requests at once, 16 new tokens, streamed (time to first token)
  P5-chat  multi-turn chats: every turn resends the conversation so far (a system prompt, earlier turns)
           plus a new question; 8 chats, 4 turns sent turn by turn, 16 new tokens, streamed
  grid     concurrency 1, 4, 16, 64 x new tokens 16, 64, 256, ~12-token inputs, 16 tasks (closed loops of
           that many clients)

Every round gets texts of its own, so that no side serves a text it saw in an earlier round.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import peer_servers as ps  # bench/ is on sys.path when this script runs

GRID_CONCURRENCY = (1, 4, 16, 64)
GRID_NEW_TOKENS = (16, 64, 256)


@dataclass(frozen=True)
class Cell:
    """One measured load: its requests per round, how many clients send them, and whether to stream."""

    name: str
    concurrency: int | None  # None: all at once
    stream: bool
    turns: int = 1  # P5-chat: requests are sent in this many consecutive waves


def cells(suite: str) -> list[Cell]:
    """The loads of a suite, in order."""
    if suite == "memory":
        return [Cell("P4", None, False), Cell("P5", None, True), Cell("P5-chat", None, True, turns=4)]
    return [Cell(f"c{c}-n{n}", c, False) for n in GRID_NEW_TOKENS for c in GRID_CONCURRENCY]


def tasks_of(suite: str) -> list[tuple[str, int, int]]:
    """(prefix, number of tasks, virtual tokens) of the suite's task sets."""
    return [("mem-t", 8, 16)] if suite == "memory" else [("grid-t", 16, 16)]


class Texts:
    """Corpus text of a given token length, from a tokenizer (BOS included in the count)."""

    def __init__(self, tokenizer, words: list[str], rng: random.Random):
        self.tokenizer, self.words, self.rng = tokenizer, words, rng

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def of_length(self, target: int) -> str:
        """About `target` tokens of words from a random place (grown by doubling, trimmed by halving)."""
        start, words = self.rng.randrange(len(self.words)), self.words
        count = max(1, target // 2)
        while len(self.ids(" ".join(words[(start + i) % len(words)] for i in range(count)))) < target:
            count *= 2
        low, high = 1, count
        while low < high:
            mid = (low + high + 1) // 2
            fits = len(self.ids(" ".join(words[(start + i) % len(words)] for i in range(mid)))) <= target
            low, high = (mid, high) if fits else (low, mid - 1)
        return " ".join(words[(start + i) % len(words)] for i in range(low))


def requests(cell: Cell, texts: Texts, long_tokens: int) -> list[ps.Request]:
    """One round's requests of `cell` (P5-chat: all turns, turn by turn)."""
    def request(task: str, text: str, max_new: int) -> ps.Request:
        return ps.Request(task, text, texts.ids(text), max_new)

    rng = texts.rng
    if cell.name == "P4":
        longs = [request(f"mem-t{i:02d}", texts.of_length(long_tokens), 64) for i in range(2)]
        shorts = [request(f"mem-t{i % 8:02d}", texts.of_length(rng.randint(32, 128)), 64) for i in range(30)]
        return longs + shorts
    if cell.name == "P5":
        shared = [texts.of_length(500) for _ in range(8)]  # one few-shot template per task
        return [request(f"mem-t{i % 8:02d}", shared[i % 8] + " Q: " + texts.of_length(20), 16) for i in range(32)]
    if cell.name == "P5-chat":
        system = texts.of_length(300)
        chats = [[system] for _ in range(8)]
        out = []
        for _ in range(cell.turns):
            for i, chat in enumerate(chats):
                chat.append(" User: " + texts.of_length(24))
                out.append(request(f"mem-t{i:02d}", "".join(chat), 16))
                chat.append(" Assistant: " + texts.of_length(32))  # the answer the client resends next turn
        return out
    concurrency, new = (int(part[1:]) for part in cell.name.split("-"))
    count = max(2 * concurrency, 8) if new < 256 else max(concurrency, 4)
    return [request(f"grid-t{i % 16:02d}", texts.of_length(12), new) for i in range(count)]
