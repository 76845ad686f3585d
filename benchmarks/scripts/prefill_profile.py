"""Where a prefill's time goes on this CPU: the default model (int8, as the server loads it), one cache
row holding 1,280 tokens of random history, then T new tokens at positions P .. P + T - 1 (the server's
turn prefills: turn 1 of bench load is ~19 new tokens after the 403-token system prompt, turn 10 ~48 after
~1,230). Int8 matmuls, the prefill-attention kernel with its cache writes (`KVCache.prefill`), or with
KUAIDA_NO_PREFILL_KERNEL=1 the cache write + fp32 copy and SDPA, are timed by wrappers; ms per prefill,
mean of 5 after 2 warm-up runs.

    python benchmarks/scripts/prefill_profile.py
    KUAIDA_NO_PREFILL_KERNEL=1 python benchmarks/scripts/prefill_profile.py

Results: benchmarks/results/kernels.md.
"""
import time

import torch
from decode_step_profile import T, timed  # this folder is on sys.path when a script here runs

from kuaida import kernels
from kuaida.bot import load_weights
from kuaida.model import kv_cache, transformer


def main() -> None:
    kernels.int8_linear = timed("int8 matmuls", kernels.int8_linear)
    transformer.sdpa = timed("SDPA", transformer.sdpa)
    kv_cache.KVCache.update = timed("cache write + fp32 copy", kv_cache.KVCache.update)
    kv_cache.KVCache.prefill = timed("prefill attention kernel", kv_cache.KVCache.prefill)
    model = load_weights("default", "int8").model
    cache = model.new_cache(batch=1, max_seq=1400)
    ids = torch.randint(100, 40000, (1, 1300), generator=torch.Generator().manual_seed(0))
    print("| new tokens after cached | ms per prefill | int8 matmuls | SDPA | cache write + fp32 copy "
          "| prefill attention kernel |")
    print("| --- | --- | --- | --- | --- | --- |")
    with torch.inference_mode():
        for s in range(0, 1280, 256):
            model(ids[:, s:s + 256], torch.arange(s, s + 256)[None], cache, rows=slice(0, 1), last_only=True)
        for p, t in [(403, 19), (1230, 48), (403, 48), (1230, 19)]:
            for rep in range(7):
                if rep == 2:
                    T.clear()
                    t0 = time.perf_counter()
                model(ids[:, p:p + t], torch.arange(p, p + t)[None], cache, rows=slice(0, 1), last_only=True)
            total = (time.perf_counter() - t0) / 5 * 1e3
            cols = [T.get(k, 0.0) / 5 * 1e3 for k in
                    ("int8 matmuls", "SDPA", "cache write + fp32 copy", "prefill attention kernel")]
            print(f"| {t} after {p} | {total:.1f} | " + " | ".join(f"{c:.1f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
