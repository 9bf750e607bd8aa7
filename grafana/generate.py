"""Write the generated dashboards (grafana/dashboards/*.json) and recording rules
(deploy/prometheus/rules/qtrap-recording.yml) from qtrap_proxy/grafana/.

    python grafana/generate.py          # write
    python grafana/generate.py --check  # exit 1 if a file is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qtrap_proxy.grafana import DASHBOARDS_DIR, generated_files  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = p.parse_args(argv)
    files = generated_files()
    stale = [
        path
        for path, text in files.items()
        if not (ROOT / path).exists() or (ROOT / path).read_text() != text
    ]
    extra = [
        path.relative_to(ROOT)
        for path in (ROOT / DASHBOARDS_DIR).glob("*.json")
        if path.relative_to(ROOT) not in files
    ]
    if args.check:
        for path in stale:
            print(f"out of date: {path}", file=sys.stderr)
        for path in extra:
            print(f"not generated: {path}", file=sys.stderr)
        return 1 if stale or extra else 0
    for path in stale:
        (ROOT / path).parent.mkdir(parents=True, exist_ok=True)
        (ROOT / path).write_text(files[path])
        print(f"wrote {path}")
    for path in extra:
        (ROOT / path).unlink()
        print(f"removed {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
