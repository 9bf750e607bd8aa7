"""The architecture contracts in pyproject.toml (``[tool.importlinter]``) hold, checked by import-linter.

The contracts: the proxy, the simulator and loadgen never import one another; ``qtrap_common``
imports none of them; the proxy and the simulator do without loadgen's heavy dependencies; the
proxy's modules sit in one-way layers; no package has an import cycle among its modules.
"""

from __future__ import annotations

import subprocess
import textwrap
import tomllib
from pathlib import Path

from tests.helpers import BIN, ROOT


def _lint(cwd: Path, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "lint-imports"), "--config", str(config), "--no-cache"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"},
    )


def test_the_contracts_hold() -> None:
    r = _lint(ROOT, ROOT / "pyproject.toml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_contracts_cover_what_the_design_promises() -> None:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    kinds = {c["type"] for c in doc["contracts"]}
    assert {"independence", "forbidden", "layers", "acyclic_siblings"} <= kinds
    independent = next(c for c in doc["contracts"] if c["type"] == "independence")
    assert set(independent["modules"]) == {"qtrap_proxy", "qtrap_sim", "loadgen"}
    assert any(
        c["type"] == "forbidden"
        and c["source_modules"] == ["qtrap_common"]
        and set(c["forbidden_modules"]) == {"qtrap_proxy", "qtrap_sim", "loadgen"}
        for c in doc["contracts"]
    )


def test_a_broken_contract_is_reported(tmp_path: Path) -> None:
    """The checker itself catches a violation here (so a passing check above means something)."""
    for pkg, body in {"alpha": "from beta import thing\n", "beta": "thing = 1\n"}.items():
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text(body)
    config = tmp_path / "pyproject.toml"
    config.write_text(
        textwrap.dedent(
            """
            [tool.importlinter]
            root_packages = ["alpha", "beta"]

            [[tool.importlinter.contracts]]
            name = "independent"
            type = "independence"
            modules = ["alpha", "beta"]
            """
        )
    )
    r = _lint(tmp_path, config)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "alpha -> beta" in r.stdout, r.stdout
