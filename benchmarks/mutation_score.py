"""The kill rate of the last ``make mutants`` run, from mutmut's cache (``.mutmut-cache``, sqlite).

    python benchmarks/mutation_score.py [.mutmut-cache] [--record docs/records/mutants_statistics.json]

Killed (tests failed) and timed-out mutants count as caught; survived and suspicious ones as missed;
untested ones (a run stopped early) are listed apart and left out of the rate, and so are skipped ones:
mutmut_config.py skips only mutants that cannot change behaviour (they touch nothing but annotations),
counted as equivalent, never as killed. ``--record`` writes the counts per module as a record
(``entropy_probe.records``) for the figures docs/mutation.md quotes.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

from entropy_probe.records import pop_record_option, write_record

CAUGHT = ("ok_killed", "bad_timeout")
MISSED = ("bad_survived", "ok_suspicious")


def scores(path: str) -> dict[str, dict]:
    """Per source file: caught, missed, tested, untested, equivalent and the kill rate caught / tested."""
    rows = sqlite3.connect(path).execute(
        "select SourceFile.filename, Mutant.status, count(*) from Mutant "
        "join Line on Mutant.line = Line.id join SourceFile on Line.sourcefile = SourceFile.id "
        "group by SourceFile.filename, Mutant.status"
    )
    by_file: dict[str, dict[str, int]] = {}
    for filename, status, n in rows:
        by_file.setdefault(filename, {})[status] = n
    out = {}
    for filename, counts in sorted(by_file.items()):
        caught = sum(counts.get(s, 0) for s in CAUGHT)
        missed = sum(counts.get(s, 0) for s in MISSED)
        out[Path(filename).stem] = {
            "caught": caught,
            "missed": missed,
            "tested": caught + missed,
            "untested": counts.get("untested", 0),
            "equivalent": counts.get("skipped", 0),
            "kill_rate": caught / (caught + missed) if caught + missed else float("nan"),
        }
    return out


def main(argv=None) -> None:
    argv, record = pop_record_option(list(sys.argv[1:] if argv is None else argv))
    path = (argv or [".mutmut-cache"])[0]
    result = scores(path)
    for name, s in result.items():
        print(
            f"{name}.py: {s['caught']} caught / {s['tested']} tested = {s['kill_rate']:.1%} "
            f"({s['untested']} untested, {s['equivalent']} equivalent skipped)"
        )
    if record is not None:
        write_record(record, ["python", "benchmarks/mutation_score.py", *argv], result)


if __name__ == "__main__":
    main()
