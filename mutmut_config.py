"""mutmut's hook (``make mutants``, docs/mutation.md): mutants that cannot change behaviour are skipped.

The one rule: a mutant that changes nothing but type annotations, in a module with ``from __future__ import
annotations``. There every annotation is kept as an unevaluated string (PEP 563): nothing runs it, and
dataclasses read it only to spot ``ClassVar``/``InitVar``, which mutmut's operators never write. The test
is exact: the module's syntax tree with every annotation removed is the same before and after the
mutation. mutmut records these as "skipped"; ``benchmarks/mutation_score.py`` counts them apart as
equivalent, never as killed.
"""

from __future__ import annotations

import ast

import mutmut


def _without_annotations(source: str) -> str | None:
    """The syntax tree with annotations removed, or None when annotations are evaluated (no PEP 563)."""
    tree = ast.parse(source)
    future = any(
        isinstance(node, ast.ImportFrom)
        and node.module == "__future__"
        and any(alias.name == "annotations" for alias in node.names)
        for node in tree.body
    )
    if not future:
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign):
            node.annotation = ast.Constant(None)
        elif isinstance(node, ast.arg):
            node.annotation = None
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
    return ast.dump(tree)


def pre_mutation(context) -> None:
    mutant = mutmut.Context(
        source=context.source,
        mutation_id=context.mutation_id,
        filename=context.filename,
        dict_synonyms=context.dict_synonyms,
        config=context.config,
    )
    mutated, n = mutmut.mutate(mutant)
    if n != 1:
        return
    original = _without_annotations(context.source)
    if original is not None and original == _without_annotations(mutated):
        context.skip = True
