import sys
from importlib.util import find_spec

# loadgen's dependencies are an extra (`pip install qtrap` is the proxy and the simulator alone).
# matplotlib (plots) and datasets (the hub) are optional at run time and say so where needed.
_missing = [m for m in ("numpy", "rich") if find_spec(m) is None]
if _missing:
    print(f"error: loadgen needs {', '.join(_missing)}: pip install 'qtrap[loadgen]'", file=sys.stderr)
    sys.exit(2)

from loadgen.cli import main  # noqa: E402

sys.exit(main())
