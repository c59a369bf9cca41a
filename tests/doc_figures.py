"""Figures quoted in README.md and docs/*.md, and the recorded runs they come from (docs/design.md 12).

A quoted figure carries its key in an HTML comment right after the number, invisible once rendered:

    correlation 0.956<!--fig demo summary.correlation--> with the truth,
    92%<!--fig demo summary.coverage95_measured--> of the fresh-sample changes

``demo`` names the record ``docs/records/demo.json`` (written by ``entropy-probe demo --record ...``, see
``make figures``); the rest is an expression over the record's ``data`` (then its top-level fields):
``a.b`` and ``a["b"]`` read a key, ``a[0]`` an item, ``+ - * / **`` and the functions in ``FUNCTIONS``
compute (``col(steps, "truth")`` is a column of a list of rows, as a numpy array). The quote must be the
value rounded as printed: as many decimals as shown (``92%`` is the value x 100, ``1.1e-04`` compares
the mantissa), so ``0.956`` holds any value in [0.9555, 0.9565].

A fenced block of printed output is quoted whole: ``<!--fig-lines demo console-->`` on the line before
the fence; every line of the block except ``...`` must be a line of the record's ``console``.

``python tests/doc_figures.py`` lists every quote that differs from its record; ``--fix`` rewrites those
numbers in place from the records (same format). Read the prose around them afterwards.
"""

from __future__ import annotations

import ast
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "docs" / "records"
DOCUMENTS = ("README.md", "docs/*.md")

NUMBER = r"(?P<number>[-+\u2212]?\d+(?:\.\d+)?(?:e[-+\u2212]?\d+)?)(?P<percent>%?)"
MARK = re.compile(NUMBER + r"<!--fig (?P<record>[\w-]+) (?P<expr>.+?)-->")
LINES_MARK = re.compile(r"^<!--fig-lines (?P<record>[\w-]+) (?P<expr>.+?)-->\s*$")
# A number a reader would take for a measurement: at least 3 significant digits, outside any mark.
BARE = re.compile(r"(?<![\w.\-+\u2212/=^])" + NUMBER + r"(?![\w.]|<!--fig)")
NOT_A_QUOTE = "<!--fig none-->"  # after a number: not a recorded figure (a constant, a setting)


def _col(rows, name):
    return np.array([float(r[name]) for r in rows])


FUNCTIONS = {
    "abs": abs,
    "argmax": lambda x: int(np.argmax(x)),
    "argmin": lambda x: int(np.argmin(x)),
    "corr": lambda x, y: float(np.corrcoef(x, y)[0, 1]),
    "col": _col,
    "count": lambda x: int(np.sum(x)),
    "len": len,
    "max": lambda x, *y: max(x, *y) if y else float(np.max(x)),
    "mean": lambda x: float(np.mean(x)),
    "min": lambda x, *y: min(x, *y) if y else float(np.min(x)),
    "rms": lambda x: float(np.sqrt(np.mean(np.square(x)))),
    "sd": lambda x: float(np.std(x, ddof=1)),
    "sqrt": math.sqrt,
    "sum": lambda x: float(np.sum(x)),
    "find": lambda rows, **kw: next(r for r in rows if all(r.get(k) == v for k, v in kw.items())),
    "where": lambda rows, key, value: [r for r in rows if r[key] == value],  # the rows with that value
    "number": lambda rows, key, value: sum(r[key] == value for r in rows),  # how many rows have it
}
_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
    ast.Lt: lambda a, b: a < b,
    ast.Gt: lambda a, b: a > b,
    ast.LtE: lambda a, b: a <= b,
    ast.GtE: lambda a, b: a >= b,
}


def evaluate(expr: str, record: dict):
    """The value of ``expr`` (the mark's expression) over ``record``; only reads and arithmetic."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in record["data"]:
                return record["data"][node.id]
            if node.id in record:
                return record[node.id]
            raise KeyError(f"no field {node.id!r} in the record")
        if isinstance(node, ast.Attribute):
            return ev(node.value)[node.attr]
        if isinstance(node, ast.Subscript):
            return ev(node.value)[ev(node.slice)]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _OPS:
            return _OPS[type(node.ops[0])](ev(node.left), ev(node.comparators[0]))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
            kwargs = {k.arg: ev(k.value) for k in node.keywords}
            return FUNCTIONS[node.func.id](*(ev(a) for a in node.args), **kwargs)
        raise ValueError(f"not allowed in a figure key: {ast.dump(node)[:60]}")

    return ev(ast.parse(expr, mode="eval"))


@dataclass(frozen=True)
class Quote:
    """One quoted number: where, as printed, and the record expression it quotes."""

    path: Path
    line: int
    text: str  # the number as printed, without the %
    percent: bool
    record: str
    expr: str
    start: int  # offset of the number in the file
    end: int

    @property
    def where(self) -> str:
        return f"{shown_path(self.path)}:{self.line}"

    def shown(self) -> float:
        return float(self.text.replace("\u2212", "-"))

    def half_ulp(self) -> float:
        """Half a unit in the last printed place: the rounding the printed number allows."""
        mantissa, _, exponent = self.text.lower().partition("e")
        decimals = len(mantissa.partition(".")[2])
        return 0.5 * 10.0 ** (-decimals) * 10.0 ** int(exponent.replace("\u2212", "-") or 0)

    def matches(self, value: float) -> bool:
        value = 100 * value if self.percent else value
        return abs(value - self.shown()) <= self.half_ulp() * (1 + 1e-9) + 1e-15

    def formatted(self, value: float) -> str:
        """``value`` printed the way this quote is printed (decimals, sign, exponent, %, minus sign)."""
        value = 100 * value if self.percent else value
        mantissa, e, exponent = self.text.lower().partition("e")
        decimals = len(mantissa.partition(".")[2])
        if e:
            m, _, x = f"{value:.{decimals}e}".partition("e")
            digits = len(exponent.lstrip("-+\u2212"))
            text = m + "e" + x[0] + x[1:].lstrip("0").rjust(digits, "0")
        else:
            text = f"{value:.{decimals}f}"
        if self.text[0] in "+\u2212" and not text.startswith("-"):
            text = "+" + text
        if self.text[0] == "\u2212" or (self.text[0] == "+" and "\u2212" in self.text):
            text = text.replace("-", "\u2212", 1)
        return text + ("%" if self.percent else "")


def shown_path(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def documents() -> list[Path]:
    return sorted({p for pattern in DOCUMENTS for p in ROOT.glob(pattern)})


def load_records() -> dict[str, dict]:
    """Every JSON file in docs/records by name. A file written by ``--record`` (``entropy_probe.records``)
    has ``command``, ``versions``, ``data``, ``console``; any other JSON (a benchmark's own output) is
    read as ``data`` alone."""
    records = {}
    for path in sorted(RECORDS.glob("*.json")):
        doc = json.loads(path.read_text())
        is_record = isinstance(doc, dict) and {"command", "versions", "data"} <= doc.keys()
        records[path.stem] = doc if is_record else {"command": None, "versions": None, "data": doc}
    return records


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _in_code(text: str) -> list[tuple[int, int]]:
    """Spans of fenced blocks and inline code: a mark shown there as an example is no quote."""
    return [(m.start(), m.end()) for m in re.finditer(r"```.*?```|`[^`\n]*`", text, flags=re.S)]


def quotes_in(path: Path) -> list[Quote]:
    text = path.read_text()
    code = _in_code(text)
    return [
        Quote(
            path, _line_of(text, m.start()), m["number"], bool(m["percent"]), m["record"], m["expr"],
            m.start(), m.start("percent") + len(m["percent"]),
        )
        for m in MARK.finditer(text)
        if not any(lo <= m.start() < hi for lo, hi in code)
    ]  # fmt: skip


def fenced_blocks(text: str) -> list[tuple[int, int, str]]:
    """(first line, last line, the line before the fence) of every fenced block, 1-based."""
    lines, blocks, start = text.splitlines(), [], None
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            if start is None:
                start = i
            else:
                blocks.append((start + 1, i + 1, lines[start - 1] if start else ""))
                start = None
    return blocks


# ---- the checks ------------------------------------------------------------------------------------
# per-step rows, settings, and a benchmark's raw per-round timings ("all": the medians and ranges are quoted)
SKIPPED_FIELDS = {"steps", "config", "settings", "options", "runs", "plots", "command", "console", "versions"}
SKIPPED_FIELDS |= {"all"}


def summary_values(data, path: str = "") -> dict[str, float]:
    """Every number of a record outside its per-step rows and settings, by the expression reading it."""
    found: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            if key in SKIPPED_FIELDS:
                continue
            sub = f"{path}.{key}" if key.isidentifier() and path else key if key.isidentifier() else None
            sub = sub or f"{path or 'data'}[{json.dumps(key)}]"
            found |= summary_values(value, sub)
    elif isinstance(data, list) and len(data) <= 32:
        for i, value in enumerate(data):
            found |= summary_values(value, f"{path}[{i}]")
    elif isinstance(data, (int, float)) and not isinstance(data, bool) and math.isfinite(data):
        found[path] = float(data)
    return found


def looks_measured(text: str, percent: bool) -> bool:
    """A number specific enough that equalling a recorded figure is no coincidence: 3+ significant
    digits, trailing zeros not counted (0.956 or -0.634, not 0.93, 1.0 or 300)."""
    mantissa = text.lower().partition("e")[0].lstrip("+-\u2212")
    digits = mantissa.replace(".", "").strip("0")  # 1.0 and 300 are settings more often than figures
    return len(digits) >= 3  # fewer digits match some recorded number by chance too often


def _outside_code(text: str) -> list[tuple[int, int]]:
    """Spans of ``text`` outside fenced blocks, inline code and HTML comments."""
    masked = re.sub(r"```.*?```|`[^`\n]*`|<!--.*?-->", lambda m: "\0" * len(m.group()), text, flags=re.S)
    return [(m.start(), m.end()) for m in re.finditer(r"[^\0]+", masked)]


def unmarked_quotes(path: Path, records: dict[str, dict]) -> list[str]:
    """Numbers left unmarked although a record the document quotes holds exactly that figure: a quote
    that could drift unseen."""
    text, problems = path.read_text(), []
    quoted = {q.record for q in quotes_in(path)}  # a document that quotes a record shows its figures marked
    pool = [
        (name, expr, v)
        for name, r in records.items()
        if name in quoted
        for expr, v in summary_values(r["data"]).items()
    ]
    for lo, hi in _outside_code(text):
        for m in BARE.finditer(text, lo, hi):
            if text.startswith("<!--fig", m.end()) or not looks_measured(m["number"], bool(m["percent"])):
                continue
            q = Quote(path, _line_of(text, m.start()), m["number"], bool(m["percent"]), "", "", 0, 0)
            hit = next(((n, e, v) for n, e, v in pool if q.matches(v)), None)
            if hit:
                problems.append(
                    f"{q.where}: {m.group()} is not marked and equals record {hit[0]} `{hit[1]}` = "
                    f"{hit[2]:.6g}: write {m.group()}<!--fig {hit[0]} {hit[1]}--> (or "
                    f"{m.group()}{NOT_A_QUOTE} if it is not that figure)"
                )
    return problems


def line_quotes(path: Path, records: dict[str, dict]) -> list[str]:
    """Fenced blocks marked ``<!--fig-lines RECORD console-->``: each line must be a recorded line."""
    text, problems = path.read_text(), []
    lines = text.splitlines()
    for first, last, before in fenced_blocks(text):
        mark = LINES_MARK.match(before.strip())
        if not mark:
            continue
        record = records.get(mark["record"])
        if record is None:
            problems.append(f"{shown_path(path)}:{first - 1}: no record docs/records/{mark['record']}.json")
            continue
        printed = {line.rstrip() for line in str(evaluate(mark["expr"], record)).splitlines()}
        for n in range(first + 1, last):
            line = lines[n - 1].rstrip()
            if line.strip() not in ("", "...") and line not in printed:
                problems.append(
                    f"{shown_path(path)}:{n}: the quoted output line {line.strip()!r} is not in "
                    f"docs/records/{mark['record']}.json `{mark['expr']}`"
                )
    return problems


def quote_problems(quote: Quote, records: dict[str, dict]) -> str | None:
    """Why ``quote`` differs from its record, or None when it is the record's value as printed."""
    record = records.get(quote.record)
    if record is None:
        return f"{quote.where}: no record docs/records/{quote.record}.json for {quote.text}"
    try:
        value = float(evaluate(quote.expr, record))
    except Exception as error:  # a key that no longer exists is a drift too
        return f"{quote.where}: `{quote.record} {quote.expr}` cannot be read: {type(error).__name__} {error}"
    if quote.matches(value):
        return None
    shown = quote.text + ("%" if quote.percent else "")
    return (
        f"{quote.where}: quote {shown} differs from docs/records/{quote.record}.json `{quote.expr}` = "
        f"{value:.6g} (printed that way: {quote.formatted(value)})"
    )


def problems(paths: list[Path] | None = None, records: dict[str, dict] | None = None) -> list[str]:
    """Every quote in ``paths`` (default: README.md, docs/*.md) that differs from its record."""
    records = load_records() if records is None else records
    found = []
    for path in documents() if paths is None else paths:
        found += [p for q in quotes_in(path) if (p := quote_problems(q, records))]
        found += line_quotes(path, records)
        found += unmarked_quotes(path, records)
    return found


def fix(paths: list[Path] | None = None, records: dict[str, dict] | None = None) -> int:
    """Rewrite every marked number that differs from its record; returns how many changed."""
    records, changed = load_records() if records is None else records, 0
    for path in documents() if paths is None else paths:
        text = path.read_text()
        for q in sorted(quotes_in(path), key=lambda q: -q.start):
            if quote_problems(q, records) and q.record in records:
                value = float(evaluate(q.expr, records[q.record]))
                text = text[: q.start] + q.formatted(value) + text[q.end :]
                changed += 1
        path.write_text(text)
    return changed


if __name__ == "__main__":
    if "--fix" in sys.argv[1:]:
        print(f"rewrote {fix()} quotes; reread the prose around them")
    print("\n".join(problems()) or "every quote equals its record")
