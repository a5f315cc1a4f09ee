"""Client settings (retry budgets) shared by the client and server tests, in one place.

A helper module, not tests/conftest.py: the root conftest.py has the same module name, so `from conftest import`
would pick whichever was imported last.
"""

from streamtrain.config import ClientConfig

# Short timeouts and a tiny backoff: a failing call gives up within seconds, and retry loops cost milliseconds.
FAST = ClientConfig(connect_timeout=0.5, read_timeout=0.5, outage_seconds=5, retry_max_attempts=6,
                    backoff_initial=0.001, backoff_max=0.01)

# The same short timeouts (stall faults stay cheap) with a budget that rides out a SIGKILL and a restart of the
# server (about 1 s down, then a start of 1-2 s) and a run of injected faults: FAST would give up after 6 attempts.
FAST_WITH_ROOM = ClientConfig(connect_timeout=0.5, read_timeout=0.5, outage_seconds=30.0, retry_max_attempts=200,
                              backoff_initial=0.02, backoff_max=0.3)
