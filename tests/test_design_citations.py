"""The code cites the project's own design document, docs/design.md, and every section it cites exists.

The outside contract the project was built from is not shipped with the package; a comment citing it
("DESIGN section N") points its readers nowhere.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "src").rglob("*.py"))
CITATION = re.compile(r"docs/design\.md,?\s+sections?\s+(\d+(?:(?:,\s*|\s+and\s+)\d+)*)")


def design_sections() -> set[int]:
    text = (ROOT / "docs" / "design.md").read_text()
    return {int(n) for n in re.findall(r"^## (\d+)\. ", text, flags=re.M)}


def test_the_code_cites_no_outside_design_section():
    found = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for path in SOURCES
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"DESIGN\s+section", line)
    ]
    assert not found, "cite docs/design.md instead:\n" + "\n".join(found)


def test_every_cited_section_of_docs_design_exists():
    sections = design_sections()
    assert sections == set(range(1, max(sections) + 1)), f"docs/design.md sections: {sorted(sections)}"
    cited = {
        (path.relative_to(ROOT), int(n))
        for path in SOURCES
        for m in CITATION.finditer(path.read_text())
        for n in re.findall(r"\d+", m.group(1))
    }
    assert cited, "the code cites no section of docs/design.md"
    missing = sorted((str(p), n) for p, n in cited if n not in sections)
    assert not missing, f"citations of sections docs/design.md does not have: {missing}"
