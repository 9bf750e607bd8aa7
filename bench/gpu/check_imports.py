"""Import what a GPU job needs before any GPU time is spent; print versions; exit 1 with every failure.

    python3 bench/gpu/check_imports.py [--optional MOD ...] [--serve] MOD ...

With REQUIRE_CUDA=1 (the default) torch must see a CUDA device; --serve also needs transformers serve's
dependencies (``is_serve_available``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="+")
    ap.add_argument("--optional", nargs="*", default=[])
    ap.add_argument("--serve", action="store_true")
    a = ap.parse_args()
    bad = []
    for m in a.modules:
        try:
            mod = importlib.import_module(m)
            print(f"  {m} {getattr(mod, '__version__', '')}")
        except Exception as e:
            bad.append(f"{m}: {type(e).__name__}: {e}")
    for m in a.optional:
        try:
            print(f"  {m} {importlib.import_module(m).__version__} (optional)")
        except Exception as e:
            print(f"  {m}: not available ({type(e).__name__}) (optional)")
    cuda = os.environ.get("REQUIRE_CUDA", "1") == "1"
    try:
        if a.serve:
            from transformers.utils.import_utils import is_serve_available

            if not is_serve_available():
                bad.append(
                    "transformers: is_serve_available() is False (needs pydantic, fastapi, uvicorn, openai)"
                )
        if cuda:
            import torch

            if not torch.cuda.is_available():
                bad.append("torch: no CUDA device")
    except ImportError:
        pass  # reported above
    if bad:
        print("IMPORT CHECK FAILED:\n  " + "\n  ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
