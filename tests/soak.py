"""Soak mode (`make soak`, STREAMTRAIN_SOAK=1) scales the kill, crash, fault and property loops up.

Nothing is skipped in either mode: the default run does the small counts, soak mode the big ones.
"""

import os

SOAK = os.environ.get("STREAMTRAIN_SOAK") == "1"
