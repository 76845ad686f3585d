"""Decode attention: this checkout's kernel against another version's, one process, taking turns.

    git show 0462882:kuaida/kernels/attention.cpp > /tmp/attention_before.cpp
    python benchmarks/scripts/decode_attention_ab.py /tmp/attention_before.cpp [THREADS] [ROUNDS]

Steps of 30 layers over fp16 caches shaped like the server's ([10 rows, 3 kv heads, 1,400 positions, 64]
per layer); SmolLM2-135M's heads (9 query, 3 kv). The other version's decode_attention takes
(q, k, v, rows, lens, scale) (before shared-prefix reads); ours runs per row and with the 403-token prefix
read once (the rows' copies of it are bitwise equal, as the scheduler makes them). Median ms per step.
Results: benchmarks/results/kernels.md, "Shared-prefix decode attention".
"""
import statistics
import sys
import time

import torch
from torch.utils import cpp_extension

from kuaida import kernels

CASES = [  # name, entries' rows, lens, srcs / shared (None: no shared prefix)
    ("1 row x 1200", [0], [1200], None, None),
    ("8 rows x 600, 403 shared", list(range(8)), [600] * 8, [0] * 8, [403] * 8),
    ("8 rows x 840, 403 shared", list(range(8)), [840] * 8, [0] * 8, [403] * 8),
    ("8 rows x 1200, 403 shared", list(range(8)), [1200] * 8, [0] * 8, [403] * 8),
    ("1 row + 7 drafts x 1200", [0] * 8, list(range(1200, 1208)), None, None),
    ("4 rows x (1 + 1 draft) x 1000, 403 shared", [0, 0, 1, 1, 2, 2, 3, 3], [1000, 1001] * 4, [0] * 8,
     [403] * 8),
]


def main() -> None:
    other_src = sys.argv[1]
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 15
    build = kernels.cache_dir() / "ext" / "attention_other"
    build.mkdir(parents=True, exist_ok=True)
    other = cpp_extension.load(name="kuaida_attention_other", sources=[other_src], build_directory=str(build),
                               extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
                               extra_ldflags=["-fopenmp"])
    ours = kernels._load("attention")
    layers = [(torch.randn(10, 3, 1400, 64).half(), torch.randn(10, 3, 1400, 64).half()) for _ in range(30)]
    for k, v in layers:  # rows 1.. hold copies of row 0's first 403 positions
        k[1:, :, :403], v[1:, :, :403] = k[:1, :, :403], v[:1, :, :403]
    print(f"threads={torch.get_num_threads()}, {rounds} rounds; ms per step of 30 layers, median\n")
    print("| step | before | this kernel, per row | this kernel, shared prefix once |")
    print("| --- | --- | --- | --- |")
    for name, rows, lens, srcs, shared in CASES:
        rows, lens = torch.tensor(rows), torch.tensor(lens)
        q, zero = torch.randn(len(rows), 9, 64), torch.zeros(len(rows), dtype=torch.long)
        src, sh = (torch.tensor(srcs), torch.tensor(shared)) if srcs else (rows, zero)
        ways = {"before": lambda k, v: other.decode_attention(q, k, v, rows, lens, 0.125),
                "per row": lambda k, v: ours.decode_attention(q, k, v, rows, lens, rows, zero, 0.125),
                "shared": lambda k, v: ours.decode_attention(q, k, v, rows, lens, src, sh, 0.125)}
        times = {w: [] for w in ways}
        for i in range(rounds + 1):  # the first round warms up
            for w, fn in ways.items():
                t0 = time.perf_counter()
                for k, v in layers:
                    fn(k, v)
                if i:
                    times[w].append(time.perf_counter() - t0)
        med = {w: statistics.median(ts) * 1e3 for w, ts in times.items()}
        shared_cell = f"{med['shared']:.2f}" if srcs else "—"
        print(f"| {name} | {med['before']:.2f} | {med['per row']:.2f} | {shared_cell} |", flush=True)


if __name__ == "__main__":
    main()
