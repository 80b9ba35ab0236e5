"""Where a run's threads spent their time, from py-spy's raw samples (`py-spy record -f raw`,
plain or gzipped): the samples grouped by the thread's role in tilefm's pipeline, then the
lines each role was at, with the tilefm frames that led there.

    py-spy record -r 100 --idle -f raw -o spy.txt -- \\
        python bench/feed.py --model vit-base --zoom 14 --readers 12 --kinds process
    python bench/spy_summary.py spy.txt --rate 100

Roles, by the frames of a sample: `mosaic` (the mosaic writer's threads: encoding, overview
sums, compression), `reader` (reading and preparing tiles, in reader threads or processes),
`main` (the thread that batches, runs the model and stitches), `other`. With `--idle`, waits
show as the line that waits (`Condition.wait`, `_queue`): a thread that waits for the GIL shows
where it is, so in-process readers look busier than they are (`py-spy --gil` samples only the
thread holding it).
"""

from __future__ import annotations

import argparse
import gzip
from collections import Counter, defaultdict
from pathlib import Path

ROLES = (
    ("mosaic", ("_finish_child", "_finish_tile", "write_now (tilefm/engine/mosaic/")),
    ("reader", ("read_prepared", "_read_into", "read_row", "tilefm/io/warp.py", "tilefm/io/read.py")),
    ("main", ("publish (tilefm/engine/pipeline.py", "<module> (feed.py", "<module> (encoder.py")),
)


def role(stack: str) -> str:
    for name, marks in ROLES:
        if any(m in stack for m in marks):
            return name
    return "other"


def summarize(path: Path, rate: float, top: int) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    by_role: dict[str, Counter[str]] = defaultdict(Counter)
    with opener(path, "rt") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            frames = stack.split(";")
            ours = [fr for fr in frames if "tilefm/" in fr or "bench/" in fr or "feed.py" in fr]
            where = " < ".join(reversed(ours[-2:])) if ours else "-"
            by_role[role(stack)][f"{frames[-1][:70]} | {where[:150]}"] += int(count)
    lines = []
    for name, counts in sorted(by_role.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(counts.values())
        lines.append(f"== {name}: {total} samples, {total / rate:.1f} thread-s")
        lines += [f"  {n / rate:7.2f} s  {where}" for where, n in counts.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw", type=Path, help="py-spy's raw output (.txt or .txt.gz)")
    ap.add_argument("--rate", type=float, default=100.0, help="the sampling rate it was recorded at (-r)")
    ap.add_argument("--top", type=int, default=12, help="lines shown per role")
    args = ap.parse_args()
    print(summarize(args.raw, args.rate, args.top))


if __name__ == "__main__":
    main()
