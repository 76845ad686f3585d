"""History policy: which messages of a conversation go into the prompt once it outgrows the context.

Stated policy
-------------
* The prompt budget is the context window minus the tokens reserved for the reply.
* The system message(s) at the start of the conversation and the latest user message (with anything
  after it) are always kept.
* When the whole conversation does not fit the budget, the oldest messages go first, a whole exchange
  at a time: a user message together with the replies that follow it, never half of one.
* Messages are dropped in steps of a quarter of the budget (`DROP_STEP`), counted from the start of the
  conversation. So when something must go, enough goes that the prompt falls back to about 75 % of the
  budget (the lower watermark), and that cut then stays where it is while the next quarter fills up.
  Why: the engine reuses the KV cache of the longest token prefix a new prompt shares with the last
  one. Dropping one exchange per turn would change the start of the prompt, and so recompute all of
  it, on every turn; this way that happens about once per quarter-window of new conversation.
* The cut is a function of the messages alone (nothing is remembered between calls): a client that
  resends the same history gets the same prompt.
* If the system prompt and the latest user message alone do not fit, the turn is refused with
  ContextLengthError, which states the limit in tokens.
"""
from __future__ import annotations

import bisect
import logging
import math
from typing import Callable

from kuaida.errors import ContextLengthError

log = logging.getLogger(__name__)

Render = Callable[[list[dict]], list[int]]
DROP_STEP = 0.25  # fraction of the prompt budget dropped at a time (1 - the lower watermark)


def fit_history(render: Render, messages: list[dict], max_prompt_tokens: int) -> tuple[list[int], int]:
    """-> (prompt token ids, number of messages dropped) under the policy above."""
    full = render(messages)
    excess = len(full) - max_prompt_tokens
    if excess <= 0:
        return full, 0
    cuts = _cut_points(messages)
    prompts = {0: full}  # render of kept_messages(messages, cut), by cut

    def length(cut: int) -> int:
        if cut not in prompts:
            prompts[cut] = render(kept_messages(messages, cut))
        return len(prompts[cut])

    # With additive message costs, len(full) - length(cut) is the size of everything before the cut:
    # requiring it to reach a whole number of steps puts the cut on a grid anchored at the start of the
    # conversation, which later turns (appended at the end) do not move.
    step = max(1, int(max_prompt_tokens * DROP_STEP))
    watermark = len(full) - math.ceil(excess / step) * step
    # The watermark is out of reach when the latest message alone is long: then just fit.
    for limit in (watermark, max_prompt_tokens):
        i = bisect.bisect_left(cuts, True, lo=1, key=lambda cut: length(cut) <= limit)
        if i < len(cuts):
            log.debug("history: dropped %d of %d messages to fit %d tokens", cuts[i], len(messages), limit)
            return prompts[cuts[i]], cuts[i]
    raise ContextLengthError(
        f"the system prompt and the latest message take {length(cuts[-1])} tokens, over the limit of "
        f"{max_prompt_tokens} prompt tokens (the context window minus the tokens reserved for the reply): "
        "shorten the message, ask for fewer max_tokens, or use a shorter system prompt"
    )


def kept_messages(messages: list[dict], dropped: int) -> list[dict]:
    """The messages a prompt was rendered from: the leading system messages, minus the `dropped`
    messages right after them."""
    head = _leading_system(messages)
    return messages[:head] + messages[head + dropped:]


def _leading_system(messages: list[dict]) -> int:
    head = 0
    while head < len(messages) and messages[head]["role"] == "system":
        head += 1
    return head


def _cut_points(messages: list[dict]) -> list[int]:
    """Numbers of messages that can be dropped without splitting an exchange, ascending from 0.

    Each droppable unit starts at a user message, or at the system message right before it (the passages
    of a knowledge-base turn), the first may start with whatever follows the leading system messages
    (e.g. an assistant greeting), and runs to the next unit; the last unit ends where the latest user
    message (with its passages) begins (or at the last message, when there is no user message)."""
    head = _leading_system(messages)
    # A system message right before a user message (a knowledge-base turn's passages) goes with it.
    users = [i - 1 if i - 1 > head and messages[i - 1]["role"] == "system" else i
             for i in range(head, len(messages)) if messages[i]["role"] == "user"]
    tail = users[-1] if users else max(head, len(messages) - 1)
    starts = [head] + [i for i in users if head < i < tail] + ([tail] if tail > head else [])
    return [s - head for s in starts]
