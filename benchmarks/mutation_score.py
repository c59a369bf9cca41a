"""The kill rate of the last ``make mutants`` run, from mutmut's cache (``.mutmut-cache``, sqlite).

    python benchmarks/mutation_score.py [.mutmut-cache]

Killed (tests failed) and timed-out mutants count as caught; survived and suspicious ones as missed;
untested ones (a run stopped early) are listed apart and left out of the rate.
"""

from __future__ import annotations

import sqlite3
import sys

CAUGHT = ("ok_killed", "bad_timeout")
MISSED = ("bad_survived", "ok_suspicious")


def main(argv=None) -> None:
    path = (argv or sys.argv[1:] or [".mutmut-cache"])[0]
    rows = sqlite3.connect(path).execute(
        "select SourceFile.filename, Mutant.status, count(*) from Mutant "
        "join Line on Mutant.line = Line.id join SourceFile on Line.sourcefile = SourceFile.id "
        "group by SourceFile.filename, Mutant.status"
    )
    by_file: dict[str, dict[str, int]] = {}
    for filename, status, n in rows:
        by_file.setdefault(filename, {})[status] = n
    for filename, counts in sorted(by_file.items()):
        caught = sum(counts.get(s, 0) for s in CAUGHT)
        missed = sum(counts.get(s, 0) for s in MISSED)
        untested = counts.get("untested", 0)
        rate = caught / (caught + missed) if caught + missed else float("nan")
        print(f"{filename}: {caught} caught / {caught + missed} tested = {rate:.1%} ({untested} untested)")


if __name__ == "__main__":
    main()
