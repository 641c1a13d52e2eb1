"""Start the compute worker (``polycl.worker``) with the bundled ``polycl`` first on ``sys.path``.

Run as a script by :class:`PolyCLSlicerLib.worker_client.WorkerClient` (``PythonSlicer worker_main.py``),
never imported.  ``python -m polycl.worker`` would import whichever ``polycl`` comes first on the path,
and Slicer's launcher puts its own paths (site-packages included) before ours, so a stale ``polycl``
installed into Slicer's Python would shadow the one shipped with this module.  This script puts the
module folder first, drops its own folder (PolyCLSlicerLib's ``core``, ``loop`` ... are not top-level
modules) and runs ``polycl.worker`` as ``__main__``.
"""

import os
import runpy
import sys

MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds the polycl package


def bundled_first(path: list[str]) -> list[str]:
    """``path`` with the module folder first and without this script's folder."""
    here = os.path.normcase(os.path.dirname(os.path.abspath(__file__)))
    module = os.path.normcase(MODULE_DIR)
    rest = [p for p in path if os.path.normcase(os.path.abspath(p or os.curdir)) not in (here, module)]
    return [MODULE_DIR, *rest]


if __name__ == "__main__":
    sys.path[:] = bundled_first(sys.path)
    runpy.run_module("polycl.worker", run_name="__main__", alter_sys=True)
