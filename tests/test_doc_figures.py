"""Every figure quoted in README.md and docs/*.md equals the recorded run it comes from.

The quote marks and their rules are in ``tests/doc_figures.py``; the records in ``docs/records/`` are
written by ``make figures`` (docs/design.md, section 12). When this test fails after a re-run, the
message names each quote, the record field and the value it holds now: ``python tests/doc_figures.py
--fix`` rewrites the marked numbers, then reread the prose around them.
"""

from __future__ import annotations

import re

import doc_figures as figures
import pytest

TORCH_FREE = ("python",)  # record fields that are no package of constraints.txt


def test_every_quote_in_the_docs_equals_its_record():
    found = figures.problems()
    assert not found, f"{len(found)} quotes differ from their records:\n" + "\n".join(found)


def test_the_docs_quote_every_record_and_make_figures_writes_each():
    makefile = (figures.ROOT / "Makefile").read_text()
    written = set(re.findall(r"--record docs/records/([\w-]+)\.json", makefile))
    records = {name for name, r in figures.load_records().items() if r["command"]}  # made by --record
    quoted = {q.record for p in figures.documents() for q in figures.quotes_in(p)}
    assert records, "no records in docs/records"
    assert records == written, f"records not written by `make figures`: {records ^ written}"
    assert records <= quoted, f"records no document quotes: {records - quoted}"


def pins(name: str = "constraints.txt") -> dict[str, str]:
    """A pin file as {normalised name: version}."""
    found = {}
    for line in (figures.ROOT / name).read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            package, version = line.split("==")
            found[_normalised(package)] = version.strip()
    return found


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.lower())


def _names(block: str) -> set[str]:
    return {_normalised(n) for n in re.findall(r'"([A-Za-z0-9_.-]+)', block)}


def test_every_dependency_in_pyproject_is_pinned():
    """A dependency added to pyproject.toml without `make lock` would install unpinned. An extra with a
    pin file of its own (constraints-<extra>.txt, its own environment) is checked against that file."""
    text = (figures.ROOT / "pyproject.toml").read_text()
    optional = text.split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = dict(re.findall(r"^(\w+) = \[(.*?)\]", optional, flags=re.M))
    main = _names(re.search(r"^dependencies = \[(.*?)\]", text, flags=re.M | re.S).group(1))
    assert "torch" in main and "trl" in _names(extras["dev"])  # the parse found the lists
    for extra, block in {"main": "", **extras}.items():
        own = figures.ROOT / f"constraints-{extra}.txt"
        pinned = pins(own.name if own.exists() else "constraints.txt")
        names = main if extra == "main" else _names(block)
        assert names <= pinned.keys(), f"{extra}: not pinned (run make lock): {sorted(names - pinned.keys())}"


def test_records_ran_on_the_pinned_versions():
    pins_ = pins()
    for name, record in figures.load_records().items():
        for package, version in (record["versions"] or {}).items():
            if package not in TORCH_FREE:
                assert version.split("+")[0] == pins_[package], (
                    f"docs/records/{name}.json ran on {package} {version}, constraints.txt pins "
                    f"{pins_[package]}: re-run `make figures` on the pinned install"
                )


# ---- the checker itself: it must see drift ---------------------------------------------------------
RECORD = {
    "command": "entropy-probe demo",
    "versions": {},
    "console": "  step   entropy\n     1     0.870\n",
    "data": {
        "summary": {"correlation": 0.98312, "coverage": 0.925, "gap": 0.0062, "tiny": 1.13e-4},
        "steps": [{"truth": -0.01, "forecast": -0.02}, {"truth": 0.03, "forecast": 0.01}],
        "checks": [{"name": "se_total (sgd)", "figures": {"ratio": 1.07}}],
    },
}


def check(tmp_path, text: str) -> list[str]:
    doc = tmp_path / "doc.md"
    doc.write_text(text)
    return figures.problems([doc], {"demo": RECORD})


@pytest.mark.parametrize(
    "text",
    [
        "corr 0.983<!--fig demo summary.correlation--> and 0.98<!--fig demo summary.correlation-->",
        "coverage 92%<!--fig demo summary.coverage--> or 92.5%<!--fig demo summary.coverage-->",
        "error 1.1e-04<!--fig demo summary.tiny--> and \u22120.0062<!--fig demo -summary.gap-->",
        "gap +0.0150<!--fig demo mean(col(steps, 'truth') - col(steps, 'forecast'))-->",
        'ratio 1.07<!--fig demo find(checks, name="se_total (sgd)").figures.ratio--> of 300 shards',
        "<!--fig-lines demo console-->\n```\n  step   entropy\n...\n     1     0.870\n```\n",
        "a setting, 0.0062<!--fig none-->, and `0.983` in code are not quotes",
        "a mark shown as an example, `0.5<!--fig demo summary.gone-->`, is not one either",
        "0.983 in a document that quotes no record is not checked",
    ],
)
def test_the_checker_accepts_quotes_that_equal_the_record(tmp_path, text):
    assert check(tmp_path, text) == []


@pytest.mark.parametrize(
    "text, says",
    [
        ("corr 0.956<!--fig demo summary.correlation-->", "quote 0.956 differs from"),
        ("corr 0.9832<!--fig demo summary.correlation-->", "printed that way: 0.9831"),
        ("coverage 91%<!--fig demo summary.coverage-->", "printed that way: 92%"),
        ("error 1.2e-04<!--fig demo summary.tiny-->", "printed that way: 1.1e-04"),
        ("x 0.5<!--fig demo summary.gone-->", "cannot be read"),
        ("x 0.5<!--fig other summary.gap-->", "no record docs/records/other.json"),
        (
            "corr 0.98<!--fig demo summary.correlation-->, later 0.983 unmarked",
            "is not marked and equals record demo `summary.correlation`",
        ),
        ("corr 0.98<!--fig demo summary.correlation-->, tiny 1.13e-04 at most", "not marked"),
        ("<!--fig-lines demo console-->\n```\n     1     0.871\n```\n", "'1     0.871' is not in"),
    ],
)
def test_the_checker_reports_drift_and_names_the_record_value(tmp_path, text, says):
    found = check(tmp_path, text)
    assert len(found) == 1 and says in found[0], found


def test_fix_rewrites_a_drifted_quote_in_its_format(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "corr \u22120.95<!--fig demo -summary.correlation--> and +1.0%<!--fig demo summary.tiny*10-->\n"
    )
    assert figures.fix([doc], {"demo": RECORD}) == 2
    assert doc.read_text() == (
        "corr \u22120.98<!--fig demo -summary.correlation--> and +0.1%<!--fig demo summary.tiny*10-->\n"
    )
    assert figures.problems([doc], {"demo": RECORD}) == []
