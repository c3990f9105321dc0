"""Shared pytest configuration: hypothesis profiles for the property-based suite.

``ci`` (the default) runs test_random_graphs.py's 300 derandomized graphs;
``long`` runs 5,000: ``python -m pytest tests/test_random_graphs.py --hypothesis-profile=long``
or ``FXRELAY_HYPOTHESIS_PROFILE=long python -m pytest tests/test_random_graphs.py`` (stopping
at the first failure). ``FXRELAY_DIFF_CASES=N`` overrides the number of cases; the long
differential run that records every failure and writes a JSON report is
``test_random_graph_long``, marked ``slow`` (deselected unless ``-m slow``; see pyproject.toml).
"""

import os

from hypothesis import HealthCheck, settings

# reason: one example builds a model, transforms it in four modes and runs the oracles
_SLOW = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=300, derandomize=True, database=None, print_blob=False, **_SLOW)
settings.register_profile("long", max_examples=5000, database=None, print_blob=True, **_SLOW)
settings.load_profile(os.environ.get("FXRELAY_HYPOTHESIS_PROFILE", "ci"))
