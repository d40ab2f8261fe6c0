"""asv benchmarks for fastbn (see asv.conf.json and the README's "Benchmarks" section).

With ``environment_type: existing`` asv does not install the project; when fastbn is
not importable from the environment, the checkout this directory belongs to is used.
"""

import os
import sys

try:
    import fastbn  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
