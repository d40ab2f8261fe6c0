"""pytest-benchmark comparison suite; kept out of ``tests/`` (not collected by a plain
``pytest`` run, whose testpaths is ``tests``).  Run it with::

    python -m pytest bench --benchmark-columns=min,median,mean,rounds --benchmark-sort=min

``FASTBN_BENCH_SMOKE=1`` uses tiny shapes (checks that the suite runs).
"""

import os
import sys

try:
    import fastbn  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
