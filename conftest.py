"""Hypothesis profiles: derandomized with no deadline in CI (set CI=1, as .ci/run does), so a
CI run never flakes; locally the same but with random examples unless HYPOTHESIS_PROFILE=ci."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))
