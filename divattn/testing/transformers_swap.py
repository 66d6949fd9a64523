"""A pytest plugin that runs transformers' own model tests on swapped models.

Every ``transformers`` Timesformer and Vivit model is swapped onto the divattn ops
(:func:`divattn.swap_attention`) right at the end of its construction (``post_init``), so
the upstream tester mixins (``ModelTesterMixin``: attentions, hidden states, gradient
checkpointing, save/load, dtype, SDPA equivalence, ...) run on swapped models. The
upstream test files are not part of this repository; run them from a transformers
checkout at the installed version (its ``tests/`` folder, with
``tests/models/timesformer`` and ``tests/models/vivit``):

    pytest -p divattn.testing.transformers_swap <transformers>/tests/models/timesformer <transformers>/tests/models/vivit

and once without ``-p`` for the unswapped baseline. ``DIVATTN_SWAP_BACKEND`` picks the
backend (default: auto). Each session ends with the number of models swapped.
"""

from __future__ import annotations

import os
import warnings

_SWAPPED = []


def pytest_configure(config):
    import transformers

    import divattn

    post_init = transformers.PreTrainedModel.post_init
    backend = os.environ.get("DIVATTN_SWAP_BACKEND") or None

    def swapped_post_init(self, *args, **kwargs):
        post_init(self, *args, **kwargs)
        name = type(self).__name__
        if name.startswith(("Timesformer", "Vivit")):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="swap_attention: found no attention")
                if divattn.swap_attention(self, backend=backend):
                    _SWAPPED.append(name)

    transformers.PreTrainedModel.post_init = swapped_post_init
    config._divattn_post_init = post_init


def pytest_unconfigure(config):
    import transformers

    post_init = getattr(config, "_divattn_post_init", None)
    if post_init is not None:
        transformers.PreTrainedModel.post_init = post_init


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"divattn: swapped {len(_SWAPPED)} transformers models onto the divattn ops")
