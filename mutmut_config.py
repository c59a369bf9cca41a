"""mutmut's hook (``make mutants``, docs/mutation.md): mutants that cannot change behaviour are skipped.

Two rules. First, a mutant that changes nothing but type annotations, in a module with
``from __future__ import annotations``: there every annotation is kept as an unevaluated string (PEP
563), nothing runs it, and dataclasses read it only to spot ``ClassVar``/``InitVar``, which mutmut's
operators never write. The test is exact: the module's syntax tree with every annotation removed is the
same before and after the mutation. Second, the mutants in ``EQUIVALENT``, each matched by its line
before and after (stripped, or indented where the same line occurs twice) and proved equivalent in its
reason. mutmut records both kinds as "skipped";
``benchmarks/mutation_score.py`` counts them apart as equivalent, never as killed.
"""

from __future__ import annotations

import ast

import mutmut

_NEVER_READ_WITHOUT = (
    "read only by _adam_step, which runs only for direction='optimizer-step', which requires an Adam/AdamW "
    "optimizer (_require_adam), whose ParamHyper sets the field explicitly from its group; a parameter the "
    "optimizer does not hold gets lr 0 and returns before any field is read"
)
_ADAM_GROUP_KEYS = (
    "the default is read only when the group lacks the key: Adam/AdamW groups always hold betas, eps, "
    "weight_decay and amsgrad, and only their hyper-parameters reach the Adam rules (_require_adam); "
    "'sgd' reads only lr, and 'optimizer-copy' discards the hyper-parameters (checks only)"
)
_FRESH_BETA2 = (
    "beta2 of the no-optimizer default is read only by 'adam-preconditioned' with no state, where v_hat = "
    "(1 - beta2) g^2 / (1 - beta2) = g^2 for any beta2 != 1, equal up to float rounding"
)
_SGD_GROUP_KEYS = (
    "this branch runs only when type(optimizer) is torch.optim.SGD, whose constructor fills every group "
    "with weight_decay, momentum and nesterov: the default of .get is never read"
)
# (line before, line after, why the mutant cannot change behaviour)
EQUIVALENT = [
    (
        'clip = _clip_coefficient(grad_j, max_grad_norm) if kind == "optimizer-step" else 1.0',
        'clip = _clip_coefficient(grad_j, max_grad_norm) if kind == "optimizer-step" else 2.0',
        "parameter_direction reads clip only for 'optimizer-step' (its last line); the other rules never do",
    ),
    (  # indented as in step_mismatch's SGD branch (the Adam branch has the same line, less indented)
        '            if group.get("weight_decay", 0) != 0:',
        '            if group.get("weight_decay", 1) != 0:',
        _SGD_GROUP_KEYS,
    ),
    (
        'if group.get("momentum", 0) != 0 and (group.get("nesterov", False) or buffers):',
        'if group.get("momentum", 1) != 0 and (group.get("nesterov", False) or buffers):',
        _SGD_GROUP_KEYS,
    ),
    (
        'if group.get("momentum", 0) != 0 and (group.get("nesterov", False) or buffers):',
        'if group.get("momentum", 0) != 0 and (group.get("nesterov", True) or buffers):',
        _SGD_GROUP_KEYS,
    ),
    (
        "se = float(x.std() / math.sqrt(b)) if b >= 2 else 0.0",
        "se = float(x.std() / math.sqrt(b)) if b > 2 else 0.0",
        "B = 2 (the only sample the mutant changes) gives the point interval either way: a resample either "
        "repeats one unit (se* = 0, dropped) or holds both (mean* = mean, t* = 0), so q_lo = q_hi = 0",
    ),
    (
        "se = float(x.std() / math.sqrt(b)) if b >= 2 else 0.0",
        "se = float(x.std() / math.sqrt(b)) if b >= 3 else 0.0",
        "as for b > 2: at B = 2 every t* is 0 and the interval is the point eta * mean either way",
    ),
    (
        "loo = lr * (x.sum() - x) / (b - 1)  # Z_(-n)",
        "loo = lr * (x.sum() + x) / (b - 1)  # Z_(-n)",
        "the jackknife SE depends on the deviations of the Z_(-n) from their mean only, and S + x_n flips "
        "their sign against S - x_n: the same sum of squares (up to float rounding)",
    ),
    (
        "betas: tuple[float, float] = (0.9, 0.999)",
        "betas: tuple[float, float] = (1.9, 0.999)",
        _NEVER_READ_WITHOUT,
    ),
    ("betas: tuple[float, float] = (0.9, 0.999)", "betas: tuple[float, float] = (0.9, 1.999)", _FRESH_BETA2),
    ("weight_decay: float = 0.0", "weight_decay: float = 1.0", _NEVER_READ_WITHOUT),
    ("weight_decay: float = 0.0", "weight_decay: float = None", _NEVER_READ_WITHOUT),
    ("decoupled: bool = False", "decoupled: bool = True", _NEVER_READ_WITHOUT),
    ("decoupled: bool = False", "decoupled: bool = None", _NEVER_READ_WITHOUT),
    ("amsgrad: bool = False", "amsgrad: bool = True", _NEVER_READ_WITHOUT),
    ("amsgrad: bool = False", "amsgrad: bool = None", _NEVER_READ_WITHOUT),
    (
        "state: dict | None = None",
        'state: dict | None = ""',
        "every read of ParamHyper.state is a truth test (not state, h.state and ..., h.state or {}), and "
        '"" is falsy like None',
    ),
    (
        'betas=tuple(float(b) for b in group.get("betas", (0.9, 0.999))),',
        'betas=tuple(float(b) for b in group.get("betas", (1.9, 0.999))),',
        _ADAM_GROUP_KEYS,
    ),
    (
        'betas=tuple(float(b) for b in group.get("betas", (0.9, 0.999))),',
        'betas=tuple(float(b) for b in group.get("betas", (0.9, 1.999))),',
        _ADAM_GROUP_KEYS,
    ),
    ('eps=float(group.get("eps", 1e-8)),', 'eps=float(group.get("eps", 2e-08)),', _ADAM_GROUP_KEYS),
    (
        'weight_decay=float(group.get("weight_decay", 0.0)),',
        'weight_decay=float(group.get("weight_decay", 1.0)),',
        _ADAM_GROUP_KEYS,
    ),
    (
        'amsgrad=bool(group.get("amsgrad", False)),',
        'amsgrad=bool(group.get("amsgrad", True)),',
        _ADAM_GROUP_KEYS,
    ),
]


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
        return
    line = context.mutation_id.line_number
    old, new = context.source.splitlines(), mutated.splitlines()
    if len(old) != len(new):
        return
    raw = (old[line].rstrip(), new[line].rstrip())  # an entry that keeps its indentation matches only there
    if any((b, a) in (raw, (raw[0].strip(), raw[1].strip())) for b, a, _ in EQUIVALENT):
        context.skip = True
