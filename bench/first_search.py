"""Benchmark: the first directory searches after the index changed, short prefixes included.

    .venv/bin/python bench/first_search.py [N] [--threepids]

Writes a Whoosh index of N generated people (default 100,000: the LDAP sync benchmark's names,
localparts user0 ... user<N-1>, two email addresses and a phone number each) as the follower does,
opens it for searches as the server does (the time until it is ready, which the server's readiness
check waits for, then the first search), then changes it (one person more) and times, in the
server's search path and without HTTP: each probe term searched right after the change (the index
opened before still answers), then each again once the changed index has taken over (the first
search of each term on it), then the benchmark's mix of terms (full names, 3-letter prefixes,
surnames with a typo): median and 99th percentile. Target: every search under 20 ms.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.directory import terms  # noqa: E402
from bench.ldap_sync import full_name  # noqa: E402
from indexer.fulltext import FullText  # noqa: E402
from indexer.identity import Identity  # noqa: E402
from server.services.directory_search import DirectorySearch, HideRules  # noqa: E402

PROBES = ["u", "us", "use", "user", "user1", "ser12", "smiht", "alice abbott", "use smith", "4479"]


def person(i: int) -> Identity:
    return Identity.build(mxid=f"@user{i}:example.org", localpart=f"user{i}", display_name=full_name(i),
                          threepids=[("email", f"user{i}@example.org"), ("email", f"u{i}@mail.example.com"),
                                     ("msisdn", f"447{i:09d}")], store="bench", store_id=f"id{i}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", nargs="?", type=int, default=100_000, help="people in the index (default 100000)")
    parser.add_argument("--threepids", action="store_true", help="index and search addresses too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mxisd-bench-") as tmp:
        index = FullText(Path(tmp) / "fulltext", args.threepids)
        started = time.perf_counter()
        index.rebuild((person(i) for i in range(args.n)), "bench", "0-0")
        print(f"index of {args.n} people written in {time.perf_counter() - started:.1f} s (setup)")
        search = DirectorySearch(index.path, HideRules([]), args.threepids)

        def timed(term: str) -> float:
            started = time.perf_counter()
            search.search(term, 10)
            return 1000 * (time.perf_counter() - started)

        started = time.perf_counter()
        deadline = time.monotonic() + 600
        while not search.ready():  # as the server's readiness check asks
            if time.monotonic() > deadline:
                raise SystemExit("the index was not opened within 10 minutes")
            time.sleep(0.01)
        print(f"ready (the index opened, its terms read) {time.perf_counter() - started:.1f} s after the start; "
              f"the first search then: {timed('smith'):.1f} ms")
        index.apply([person(args.n)], [], "bench", "0-1")
        changed = time.perf_counter()
        show("right after the change, while the changed index opens", [(p, timed(p)) for p in PROBES])
        wait_for(search, args.n)
        print(f"the changed index took over {time.perf_counter() - changed:.1f} s after the change "
              "(the searches above included)")
        index.apply([person(args.n + 1)], [], "bench", "0-2")
        wait_for(search, args.n + 1)
        show("another change; the first searches once it took over", [(p, timed(p)) for p in PROBES])
        mix = terms(2000, args.n, random.Random(42))
        timings = [(timed(t), t) for t in mix]
        latencies = sorted(ms for ms, _ in timings)
        print("slowest: " + ", ".join(f"{term!r} {ms:.1f}" for ms, term in sorted(timings)[-3:]))
        print(f"then {len(mix)} searches of the directory benchmark's terms, each term's first search included: "
              f"median {statistics.median(latencies):.3f} ms, p99 {latencies[int(0.99 * len(latencies))]:.2f} ms, "
              f"max {latencies[-1]:.1f} ms")
        search.close()


def wait_for(search: DirectorySearch, i: int) -> None:
    """Wait until a search finds user<i> (the changed index has taken over)."""
    deadline = time.monotonic() + 600
    while not search.search(f"user{i}", 1)[0]:
        if time.monotonic() > deadline:
            raise SystemExit("the changed index was not searched within 10 minutes")
        time.sleep(0.05)


def show(label: str, figures: list[tuple[str, float]]) -> None:
    print(f"{label} (ms): " + ", ".join(f"{term!r} {ms:.1f}" for term, ms in figures), flush=True)


if __name__ == "__main__":
    main()
