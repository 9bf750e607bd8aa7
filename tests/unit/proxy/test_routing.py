from __future__ import annotations

import pytest

from qtrap_proxy.config import load_config
from qtrap_proxy.errors import BadRequest, NotFound
from qtrap_proxy.routing import Router
from qtrap_proxy.upstream import Backend


def _router() -> Router:
    cfg = load_config(
        data={
            "backends": [
                {
                    "name": "bf16-a",
                    "pool": "q8",
                    "precision": "bf16",
                    "url": "http://h:1",
                    "model": "Qwen/Qwen3-8B",
                },
                {
                    "name": "bf16-b",
                    "pool": "q8",
                    "precision": "bf16",
                    "url": "http://h:2",
                    "model": "Qwen/Qwen3-8B",
                },
                {
                    "name": "int4",
                    "pool": "q8",
                    "precision": "int4",
                    "kind": "tgi",
                    "url": "http://h:3",
                    "model": "Qwen/Qwen3-8B-AWQ",
                },
                {
                    "name": "small",
                    "pool": "q06",
                    "precision": "bf16",
                    "url": "http://h:4",
                    "model": "Qwen/Qwen3-0.6B",
                },
            ],
            "pools": {"q8": {"default_precision": "bf16"}},
        }
    )
    return Router(cfg, [Backend(b) for b in cfg.backends])


def test_resolution() -> None:
    r = _router()
    assert r.resolve("q8", None) == ("q8", "bf16")
    assert r.resolve("q8@int4", None) == ("q8", "int4")
    assert r.resolve("q8", "int4") == ("q8", "int4")
    assert r.resolve("q8@int4", "int4") == ("q8", "int4")
    # the upstream id is an alias of its pool, so unchanged clients keep working
    assert r.resolve("Qwen/Qwen3-8B-AWQ", None) == ("q8", "bf16")
    assert r.resolve("Qwen/Qwen3-0.6B@bf16", None) == ("q06", "bf16")


def test_resolution_errors() -> None:
    r = _router()
    with pytest.raises(NotFound, match="does not exist"):
        r.resolve("llama", None)
    with pytest.raises(NotFound, match="no backend at precision `fp8`") as ei:
        r.resolve("q8@fp8", None)
    assert ei.value.code == "precision_not_found"
    with pytest.raises(NotFound):
        r.resolve("q06", "int4")
    with pytest.raises(BadRequest, match="pinned twice"):
        r.resolve("q8@int4", "bf16")


def test_round_robin_over_replicas() -> None:
    r = _router()
    picks = [r.choose("q8", "bf16").name for _ in range(6)]
    assert picks == ["bf16-a", "bf16-b"] * 3


def test_kind_filter() -> None:
    r = _router()
    tgi = frozenset({"tgi"})
    assert r.resolve("q8", None, kinds=tgi) == ("q8", "int4")  # the default (bf16) has no TGI backend
    assert r.resolve("q8", "bf16", kinds=tgi) == ("q8", "bf16")  # a pin is kept (choose() then says 404)
    assert r.choose("q8", "int4", kinds=frozenset({"tgi"})).name == "int4"
    with pytest.raises(NotFound, match="no backend of kind tgi"):
        r.choose("q8", "bf16", kinds=frozenset({"tgi"}))
