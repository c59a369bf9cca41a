"""``entropy-probe validate``: unbiasedness and calibration checks on an exactly enumerable policy.

``problem`` (policy, fixed U, v, exact answers), ``checks`` (each check), ``stats`` (the sampling
distributions behind the tolerances), ``plots``, ``run`` (the harness and the command). See
docs/validation.md.
"""

from .run import main, run_validation

__all__ = ["main", "run_validation"]
