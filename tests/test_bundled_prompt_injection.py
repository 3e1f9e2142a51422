"""The bundled prompt_injection detector is what its recipe builds (see test_bundled.py;
this rebuild is the longest, so it has a file of its own for the test workers; like the
other long rebuilds it runs only with ACTENG_REBUILD=1)."""

from __future__ import annotations

import pytest

import acteng
from tests.helpers import check_rebuild


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.rebuild
def test_shipped_prompt_injection_is_what_its_recipe_builds(smollm2: acteng.Model) -> None:
    check_rebuild(smollm2, "prompt_injection")
