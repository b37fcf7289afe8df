"""Data pipeline throughput (tokens/s, non-pad) for the default data config.

    python benchmarks/data_throughput.py                       # seq_len 1024, batch 16, 200 steps, MLM 30%
    python benchmarks/data_throughput.py --steps=400 --mlm_rate=0

Reports the first epoch (tokenizing as it goes) and the steady state (tokenized documents cached), both from a
fresh pipeline, single process, on this machine. The demo train step consumes a few thousand tokens/s on 2 CPU
cores; the pipeline must deliver at least 10x that.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ettin_jax.data as data  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--mlm_rate", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    t0 = time.perf_counter()
    pipe = data.make_pipeline(data.default_data_config(), seq_len=args.seq_len, global_batch_size=args.batch,
                              seed=args.seed, mlm_rate=args.mlm_rate)
    print(f"make_pipeline: {time.perf_counter() - t0:.2f} s")
    it = pipe.iterator()
    for label in ("first pass (tokenizing)", "second pass (cached)"):
        tokens_before = pipe.stats()["tokens"]
        t0 = time.perf_counter()
        for _ in range(args.steps):
            next(it)
        dt = time.perf_counter() - t0
        tokens = pipe.stats()["tokens"] - tokens_before
        print(f"{label}: {args.steps} steps x {args.batch} x {args.seq_len}: {dt:.2f} s, "
              f"{tokens / dt:,.0f} tokens/s, {args.steps / dt:.1f} steps/s")
    stats = pipe.stats()
    print(f"packing efficiency {stats['packing_efficiency']:.4f}; documents used {stats['documents_used']}; "
          f"read {stats['documents_read']}")


if __name__ == "__main__":
    main()
