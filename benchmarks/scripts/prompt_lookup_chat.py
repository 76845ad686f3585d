"""Prompt lookup on plain chat replies (no knowledge base): the same replies, and how much faster?

    python benchmarks/scripts/prompt_lookup_chat.py          # ~4 min on 2 cores

1. The single-stream engine (kuaida.bot): 24 chitchat prompts, greedy, 96 tokens, each answered with
   lookup off then on from an empty cache: decode tok/s both ways, replies identical.
2. The server's scheduler (kuaida.engine.scheduler): 16 chitchat prompts, greedy, 64 tokens, one at a
   time and 8 at once, lookup off then on: output tok/s (prefill included), replies identical.
Numbers of a run: README.md, "Prompt lookup".
"""
import time

import torch

from kuaida.bench.prompts import dialogue_prompts
from kuaida.bot import load, load_weights
from kuaida.dialogue.template import end_of_turn_ids, render_prompt
from kuaida.engine.lookup import LookupConfig
from kuaida.engine.sampling import SamplingParams
from kuaida.engine.scheduler import Scheduler


def engine_part() -> None:
    bot = load("default", dtype="int8")
    prompts = dialogue_prompts(24, seed=3)
    seconds, tokens, same = {"off": 0.0, "on": 0.0}, {"off": 0, "on": 0}, 0
    for messages in prompts:
        replies = {}
        for mode, config in (("off", None), ("on", LookupConfig())):
            bot.use_prompt_lookup(config)
            bot.engine.cached_ids = []
            replies[mode] = bot.chat(messages, max_new_tokens=96, temperature=0.0)
            seconds[mode] += bot.last_stats.decode_s
            tokens[mode] += bot.last_stats.completion_tokens - 1
        same += replies["off"] == replies["on"]
    off, on = tokens["off"] / seconds["off"], tokens["on"] / seconds["on"]
    print(f"engine: decode {off:.1f} -> {on:.1f} tok/s ({on / off:.2f}x), identical {same}/{len(prompts)}, "
          f"{bot.engine.lookup_stats}", flush=True)


def scheduler_part() -> None:
    loaded = load_weights("default", "int8")
    tok = loaded.tokenizer
    prompts = [render_prompt(tok, m) for m in dialogue_prompts(16, seed=5)]
    params = SamplingParams(max_new_tokens=64, temperature=0)
    texts = {}
    for config in (None, LookupConfig()):
        sched = Scheduler(loaded.model, tok, end_of_turn_ids(tok, loaded.path), max_batch=8, max_context=2048,
                          cache_budget_mb=512, lookup=config).start()
        try:
            for together in (1, 8):
                for slot in sched.slots:
                    slot.cached_ids = []  # every prompt prefilled whole, both ways
                t0, out, n = time.perf_counter(), [], 0
                for i in range(0, len(prompts), together):
                    streams = [sched.submit(p, params) for p in prompts[i:i + together]]
                    out += ["".join(s) for s in streams]
                    n += sum(s.stats.completion_tokens for s in streams)
                texts[config is not None, together] = out
                print(f"scheduler, lookup {'on' if config else 'off'}, {together} at once: "
                      f"{n / (time.perf_counter() - t0):.1f} tok/s", flush=True)
        finally:
            sched.stop()
    for together in (1, 8):
        same = sum(a == b for a, b in zip(texts[False, together], texts[True, together]))
        print(f"scheduler, {together} at once: identical {same}/{len(prompts)}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    engine_part()
    scheduler_part()
