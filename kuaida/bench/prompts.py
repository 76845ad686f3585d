"""Benchmark prompts: short, real dialogues from the `chitchat-dataset` package, picked by a seed.

A chitchat conversation is a list of turns; a turn is the consecutive messages of one speaker. A prompt
is a window of 1–4 user turns with the assistant turns between them, ending on a user turn, so every
prompt asks the model for the next reply, as a chat user would.
"""
from __future__ import annotations

import functools
import random


def conversation_turns(conversation: dict) -> list[str]:
    """A chitchat conversation -> its turns as text (one speaker's messages joined by spaces)."""
    return [" ".join(m["text"].strip() for m in turn) for turn in conversation["messages"]]


def window_to_messages(turns: list[str]) -> list[dict[str, str]]:
    """An odd number of alternating turns -> OpenAI messages: user, assistant, ..., user."""
    if len(turns) % 2 == 0:
        raise ValueError("a prompt window needs an odd number of turns to end on a user turn")
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]


@functools.lru_cache(maxsize=1)
def load_conversations() -> dict[str, dict]:
    import chitchat_dataset  # ~1.5 s to load: only when prompts are asked for

    return dict(chitchat_dataset.Dataset())


def dialogue_prompts(n: int = 8, seed: int = 0, max_user_turns: int = 4) -> list[list[dict[str, str]]]:
    """`n` message lists, the same for the same seed: each 1..max_user_turns user turns with the
    assistant turns between them (1, 3, 5 or 7 messages), ending on a user turn."""
    dataset = load_conversations()
    rng = random.Random(seed)
    # Sorted ids: the pick depends on the seed only, not on the dataset file's order.
    ids = sorted(dataset)
    prompts = []
    while len(prompts) < n:
        turns = conversation_turns(dataset[rng.choice(ids)])
        size = 2 * rng.randint(1, max_user_turns) - 1
        if len(turns) < size:
            continue
        start = rng.randrange(len(turns) - size + 1)
        window = turns[start:start + size]
        if all(window):  # an empty turn would make an empty message
            prompts.append(window_to_messages(window))
    return prompts
