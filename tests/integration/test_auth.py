"""API keys end to end (auth.enabled): a real proxy process in front of simulated vLLM and TGI backends
metered through their DCGM counters, driven with the openai SDK, TGI's client and plain HTTP."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from text_generation import Client
from text_generation.errors import UnknownError

from qtrap_proxy.keystore import ApiKey, KeyStore
from tests.helpers import BIN, backend, free_port, proxy, sim, wait_meter
from tests.integration import fake_backend
from tests.integration.inproc import running_proxy

ADMIN = "qa-" + "a" * 40  # the admin key (its SHA-256 is in the config)
REFRESH_S = 0.5


@dataclass
class Setup:
    url: str
    config: Path
    store: KeyStore
    alice: tuple[ApiKey, str]  # every pool
    bob: tuple[ApiKey, str]  # every pool
    carol: tuple[ApiKey, str]  # pool tgi8b only

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def get(self, path: str, secret: str | None = None, **kw: Any) -> requests.Response:
        headers = {} if secret is None else {"Authorization": f"Bearer {secret}"}
        return requests.get(self.url + path, headers=headers, timeout=10, **kw)

    def post(self, path: str, secret: str | None, body: Any, **headers: str) -> requests.Response:
        if secret is not None:
            headers["Authorization"] = f"Bearer {secret}"
        return requests.post(self.url + path, json=body, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("auth")
    pv, pt = free_port(), free_port()
    common = ["--model", "qwen3-8b", "--step-ms", "2"]
    store = KeyStore(str(tmp / "keys.sqlite"))
    alice = store.create("alice")
    bob = store.create("bob")
    carol = store.create("carol", pools=["tgi8b"])
    with (
        sim(pv, *common, "--precision", "bf16", "--gpu-index", "0"),
        sim(pt, *common, "--precision", "int8", "--api", "tgi", "--gpu-index", "1"),
    ):
        cfg: dict[str, Any] = {
            "backends": [
                backend("sim-bf16", pv, "bf16", devices=[{"host": "qtrap-sim", "index": 0}]),
                backend(
                    "sim-tgi",
                    pt,
                    "int8",
                    pool="tgi8b",
                    kind="tgi",
                    devices=[{"host": "qtrap-sim", "index": 1}],
                ),
            ],
            "meter": {
                "kind": "dcgm",
                "urls": [f"http://127.0.0.1:{p}/dcgm/metrics" for p in (pv, pt)],
                "settle_s": 0.3,
            },
            "auth": {
                "enabled": True,
                "keys_path": str(tmp / "keys.sqlite"),
                "admin_key_sha256": hashlib.sha256(ADMIN.encode()).hexdigest(),
                "refresh_s": REFRESH_S,
                "key_metrics": True,
            },
        }
        with proxy(tmp, cfg):
            port = cfg["server"]["port"]
            url = f"http://127.0.0.1:{port}"
            wait_meter(url, headers={"Authorization": f"Bearer {ADMIN}"})
            yield Setup(url, tmp / f"proxy-{port}.yaml", store, alice, bob, carol)


def _client(s: Setup, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.v1, api_key=secret, max_retries=0)


def _chat(s: Setup, secret: str, model: str = "qwen3-8b", **headers: str) -> str:
    with _client(s, secret) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": "one two three"}],
            max_tokens=5,
            extra_headers=headers,
        )
    return raw.headers["x-qtrap-request-id"]


def _final(s: Setup, rid: str, secret: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:
        rec: dict[str, Any] = s.get(f"/qtrap/v1/requests/{rid}", secret).json()
        if rec.get("final"):
            return rec
        assert time.monotonic() < deadline, f"record {rid} never became final: {rec}"
        time.sleep(0.05)


def _metric(s: Setup, name: str) -> float:
    for line in s.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_key_works_with_the_openai_sdk_and_its_id_is_on_the_record(setup: Setup) -> None:
    key, secret = setup.alice
    rid = _chat(setup, secret)
    rec = _final(setup, rid, secret)
    assert rec["key_id"] == key.id and rec["status"] == "ok" and rec["energy_j"] > 0
    with _client(setup, secret) as client:
        chunks = list(
            client.chat.completions.create(
                model="qwen3-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
        assert {"qwen3-8b", "tgi8b"} <= {m.id for m in client.models.list()}
    with _client(setup, setup.carol[1]) as client:  # a key limited to some pools sees only those
        assert {m.id for m in client.models.list()} == {"tgi8b", "tgi8b@int8"}


def test_no_key_an_unknown_key_and_a_bad_scheme_get_401(setup: Setup) -> None:
    before = _metric(setup, 'qtrap_refused_requests_total{reason="unauthorized"}')
    for secret in ("qk-not-a-key", setup.alice[1] + "x"):
        with pytest.raises(openai.AuthenticationError) as err:
            _chat(setup, secret)
        assert err.value.status_code == 401 and err.value.response.headers["www-authenticate"].startswith(
            "Bearer"
        )
        body = err.value.response.json()["error"]
        assert (body["code"], body["type"]) == ("invalid_api_key", "invalid_request_error")
    r = setup.post(
        "/v1/chat/completions", None, {"model": "qwen3-8b", "messages": [{"role": "user", "content": "x"}]}
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert r.headers["www-authenticate"] == 'Bearer realm="qtrap"'
    r = setup.post(
        "/v1/chat/completions",
        None,
        {"model": "qwen3-8b", "messages": [{"role": "user", "content": "x"}]},
        Authorization=f"Basic {setup.alice[1]}",
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert _metric(setup, 'qtrap_refused_requests_total{reason="unauthorized"}') == before + 4
    assert setup.get("/health").status_code == 200  # open
    assert setup.get("/metrics").status_code == 200  # open unless auth.protect_metrics


def test_a_key_revoked_while_the_proxy_runs_is_refused_within_refresh_s(setup: Setup) -> None:
    key, secret = setup.store.create("short-lived")
    time.sleep(REFRESH_S * 1.5)  # the proxy reads the new key
    assert _chat(setup, secret)
    r = subprocess.run(
        [str(BIN / "qtrap-proxy"), "keys", "revoke", key.id, "--config", str(setup.config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and f"{key.id} revoked at" in r.stdout, r.stderr
    revoked = time.monotonic()
    while True:
        try:
            _chat(setup, secret)
        except openai.AuthenticationError as e:
            assert "revoked" in str(e)
            break
        assert time.monotonic() - revoked < REFRESH_S + 1.0, "revocation not seen within refresh_s"
        time.sleep(0.05)


def test_an_expired_key_gets_401(setup: Setup) -> None:
    expires = time.time() + REFRESH_S * 2 + 1.0
    _, secret = setup.store.create("expiring", expires_unix_s=expires)
    time.sleep(REFRESH_S * 1.5)
    assert _chat(setup, secret)
    time.sleep(max(0.0, expires - time.time()) + 0.05)
    with pytest.raises(openai.AuthenticationError, match="expired"):
        _chat(setup, secret)


def test_a_pool_outside_the_keys_allow_list_gets_403_and_a_record(setup: Setup) -> None:
    key, secret = setup.carol
    with pytest.raises(openai.PermissionDeniedError) as err:
        _chat(setup, secret, "qwen3-8b")
    rid = err.value.response.headers["x-qtrap-request-id"]
    rec = setup.get(f"/qtrap/v1/requests/{rid}", ADMIN).json()
    assert (rec["key_id"], rec["status"], rec["http_status"]) == (key.id, "forbidden", 403)
    assert rec["backend"] is None  # nothing was sent upstream
    # its own pool works, on TGI's native routes too
    resp = Client(setup.url, headers={"Authorization": f"Bearer {secret}"}).generate("x y", max_new_tokens=3)
    assert resp.details.generated_tokens == 3


def test_the_tgi_routes_need_a_key(setup: Setup) -> None:
    with pytest.raises(UnknownError, match="API key"):
        Client(setup.url).generate("x", max_new_tokens=2)
    r = setup.post("/generate", None, {"inputs": "x", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 401 and r.json()["error_type"] == "invalid_request_error"  # TGI's error shape
    r = setup.post("/generate_stream", "qk-wrong", {"inputs": "x", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 401
    key, secret = setup.alice
    r = setup.post("/generate", secret, {"inputs": "x", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200
    assert (
        setup.get(f"/qtrap/v1/requests/{r.headers['x-qtrap-request-id']}", secret).json()["key_id"] == key.id
    )


def test_admin_routes_take_the_admin_key_only(setup: Setup) -> None:
    before = _metric(setup, 'qtrap_refused_requests_total{reason="forbidden"}')
    for path in ("/qtrap/v1/energy", "/qtrap/v1/keys", "/qtrap/v1/unknown"):
        assert setup.get(path).status_code == 401
        r = setup.get(path, setup.alice[1])
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    assert setup.get("/qtrap/v1/energy", ADMIN).status_code == 200
    listed = setup.get("/qtrap/v1/keys", ADMIN).json()["keys"]
    assert {k["name"] for k in listed} >= {"alice", "bob", "carol"}
    assert not any("secret" in k or "sha256" in k for k in listed)
    # the admin key is not a client key: it does not reach the serving routes
    with pytest.raises(openai.PermissionDeniedError):
        _chat(setup, ADMIN)
    assert _metric(setup, 'qtrap_refused_requests_total{reason="forbidden"}') == before + 4


def test_a_key_reads_its_own_records_and_chains_and_nobody_elses(setup: Setup) -> None:
    (alice, a_secret), (_, b_secret) = setup.alice, setup.bob
    rid = _chat(setup, a_secret, **{"x-qtrap-chain-id": "auth-chain-1", "x-qtrap-hop": "1"})
    assert setup.get(f"/qtrap/v1/requests/{rid}", a_secret).status_code == 200
    assert setup.get(f"/qtrap/v1/requests/{rid}", ADMIN).json()["key_id"] == alice.id
    r = setup.get(f"/qtrap/v1/requests/{rid}", b_secret)
    assert r.status_code == 404  # not 403: another key's ids cannot be told from unknown ones
    assert setup.get("/qtrap/v1/requests/no-such-id", b_secret).status_code == 404
    assert setup.get(f"/qtrap/v1/requests/{rid}").status_code == 401
    assert setup.get("/qtrap/v1/chains/auth-chain-1", a_secret).json()["requests"] == 1
    assert setup.get("/qtrap/v1/chains/auth-chain-1", b_secret).status_code == 404
    # a chain id two keys both used: each key sees its own records of it, the admin all of them
    _chat(setup, b_secret, **{"x-qtrap-chain-id": "auth-chain-1", "x-qtrap-hop": "2"})
    assert setup.get("/qtrap/v1/chains/auth-chain-1", a_secret).json()["requests"] == 1
    assert setup.get("/qtrap/v1/chains/auth-chain-1", b_secret).json()["requests"] == 1
    assert setup.get("/qtrap/v1/chains/auth-chain-1", ADMIN).json()["requests"] == 2


def test_only_the_chains_owner_or_the_admin_may_score_it(setup: Setup) -> None:
    (_, a_secret), (_, b_secret), (_, c_secret) = setup.alice, setup.bob, setup.carol
    _chat(setup, a_secret, **{"x-qtrap-chain-id": "auth-chain-2", "x-qtrap-hop": "1"})
    verdict = {"correct": True, "hops": 1}
    r = setup.post("/qtrap/v1/chains/auth-chain-2/score", c_secret, verdict)
    assert r.status_code == 404  # carol has no record in it
    _chat(setup, b_secret, **{"x-qtrap-chain-id": "auth-chain-2", "x-qtrap-hop": "2"})
    r = setup.post("/qtrap/v1/chains/auth-chain-2/score", b_secret, verdict)
    assert r.status_code == 403  # bob joined alice's chain: he does not own it
    assert setup.post("/qtrap/v1/chains/auth-chain-2/score", None, verdict).status_code == 401
    r = setup.post("/qtrap/v1/chains/auth-chain-2/score", a_secret, verdict)
    assert r.status_code == 200 and r.json()["counted"] is True
    r = setup.post("/qtrap/v1/chains/auth-chain-2/score", ADMIN, verdict)
    assert r.status_code == 200 and r.json()["counted"] is False  # once per chain


def test_per_key_usage_is_the_sum_of_the_keys_records(setup: Setup) -> None:
    key, secret = setup.store.create("usage")
    time.sleep(REFRESH_S * 1.5)
    since = time.time()
    rids = [_chat(setup, secret) for _ in range(3)]
    r = setup.post("/generate", secret, {"inputs": "a b c d", "parameters": {"max_new_tokens": 4}})
    rids.append(r.headers["x-qtrap-request-id"])
    _chat(setup, setup.bob[1])  # another key's request is not counted
    recs = [_final(setup, rid, secret) for rid in rids]
    deadline = time.monotonic() + 10
    while True:  # final records are committed to the ledger in batches
        usage = setup.get(f"/qtrap/v1/keys/{key.id}/usage", secret, params={"since": str(since)}).json()
        if usage["requests"] == len(rids) and usage["not_final_requests"] == 0:
            break
        assert time.monotonic() < deadline, usage
        time.sleep(0.05)
    assert usage["key_id"] == key.id and usage["name"] == "usage"
    assert usage["completion_tokens"] == sum(r["completion_tokens"] for r in recs) == 3 * 5 + 4
    assert usage["prompt_tokens"] == sum(r["prompt_tokens"] for r in recs)
    assert usage["energy_j"] == pytest.approx(sum(r["energy_j"] for r in recs), rel=1e-9)
    assert usage["idle_energy_j"] == pytest.approx(sum(r["idle_energy_j"] for r in recs), abs=1e-9)
    assert usage["energy_unknown_requests"] == 0 and usage["energy_null_reason"] is None
    by = {p["precision"]: p for p in usage["by_precision"]}
    assert set(by) == {"bf16", "int8"} and (by["bf16"]["requests"], by["int8"]["requests"]) == (3, 1)
    assert by["int8"]["energy_j"] == pytest.approx(recs[3]["energy_j"], rel=1e-9)
    as_admin = setup.get(f"/qtrap/v1/keys/{key.id}/usage", ADMIN, params={"since": str(since)}).json()
    assert {**as_admin, "until_unix_s": 0} == {**usage, "until_unix_s": 0}
    # a window before the requests holds none of them: 0 requests, 0 J (nothing used is known to be 0)
    early = setup.get(f"/qtrap/v1/keys/{key.id}/usage", secret, params={"until": str(since)}).json()
    assert (early["requests"], early["energy_j"], early["by_precision"]) == (0, 0.0, [])
    # another key's usage is not found; a bad id or time is refused before any SQL
    assert setup.get(f"/qtrap/v1/keys/{key.id}/usage", setup.bob[1]).status_code == 404
    assert setup.get("/qtrap/v1/keys/key_000000000000/usage", ADMIN).status_code == 404
    assert setup.get("/qtrap/v1/keys/'%20OR%201=1/usage", ADMIN).status_code == 404
    assert (
        setup.get(f"/qtrap/v1/keys/{key.id}/usage", secret, params={"since": "yesterday"}).status_code == 400
    )
    # the opt-in per-key metric, labelled by the key's name
    assert _metric(setup, 'qtrap_key_requests_total{key="usage"}') == len(rids)
    assert _metric(setup, 'qtrap_key_energy_joules_total{key="usage"}') == pytest.approx(usage["energy_j"])


# ------------------------------------------------------------------ what the backend sees (in-process proxy)


def _fake_cfg(port: int, auth: dict[str, Any] | None, **backend_extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "backends": [
            {
                "name": "fake",
                "pool": "p",
                "precision": "bf16",
                "kind": "openai",
                "url": f"http://127.0.0.1:{port}",
                "model": "echo",
                **backend_extra,
            }
        ]
    }
    if auth is not None:
        cfg["auth"] = {"admin_key_sha256": hashlib.sha256(ADMIN.encode()).hexdigest(), **auth}
    return cfg


def _fake_chat(url: str, secret: str) -> requests.Response:
    return requests.post(
        url + "/v1/chat/completions",
        json={"model": "p", "messages": [{"role": "user", "content": "x"}]},
        headers={"Authorization": f"Bearer {secret}"},
        timeout=10,
    )


def test_the_backend_never_sees_the_clients_key_when_auth_is_on(tmp_path: Path) -> None:
    port = free_port()
    with fake_backend.running(port) as fb:
        with running_proxy(tmp_path / "off", _fake_cfg(port, None)) as off:
            assert _fake_chat(off.url, "client-token").status_code == 200
        assert fb.headers[-1]["authorization"] == "Bearer client-token"  # auth off: forwarded, as before
        _, secret = KeyStore(str(tmp_path / "keys.sqlite")).create("k")
        auth = {"enabled": True, "keys_path": str(tmp_path / "keys.sqlite")}
        with running_proxy(tmp_path / "on", _fake_cfg(port, auth)) as on:
            assert _fake_chat(on.url, secret).status_code == 200
            assert "authorization" not in fb.headers[-1]
        with running_proxy(tmp_path / "key", _fake_cfg(port, auth, api_key="backend-secret")) as on:
            assert _fake_chat(on.url, secret).status_code == 200
            assert fb.headers[-1]["authorization"] == "Bearer backend-secret"
    assert not any(secret in str(h) for h in fb.headers)


def test_protected_metrics_take_the_admin_key(tmp_path: Path) -> None:
    auth = {"enabled": True, "protect_metrics": True}
    _, secret = KeyStore(str(tmp_path / "qtrap-keys.sqlite")).create("k")  # the default: beside the ledger
    with running_proxy(tmp_path, _fake_cfg(9, auth)) as p:
        assert requests.get(p.url + "/metrics", timeout=5).status_code == 401
        assert (
            requests.get(
                p.url + "/metrics", headers={"Authorization": f"Bearer {secret}"}, timeout=5
            ).status_code
            == 403
        )
        r = requests.get(p.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5)
        assert r.status_code == 200 and "qtrap_refused_requests_total" in r.text
        assert requests.get(p.url + "/health", timeout=5).status_code in (200, 503)  # open either way


def test_the_records_query_and_usage_show_a_client_key_its_own_records_only(setup: Setup) -> None:
    alice_key, alice = setup.alice
    bob_key, bob = setup.bob
    tag = f"shared-{time.monotonic_ns()}"
    ra = _chat(setup, alice, **{"x-qtrap-chain-id": tag, "X-Request-Id": "same-id"})
    rb = _chat(setup, bob, **{"x-qtrap-chain-id": tag, "X-Request-Id": "same-id"})
    _final(setup, ra, alice)
    _final(setup, rb, bob)

    def ids(secret: str, **params: str) -> list[str]:
        r = setup.get("/qtrap/v1/requests", secret, params=params)
        assert r.status_code == 200, r.text
        return [rec["id"] for rec in r.json()["data"]]

    assert ids(alice, chain_id=tag) == [ra] and ids(bob, chain_id=tag) == [rb]
    assert ids(alice, client_request_id="same-id") == [ra]  # bob's record with the same id is not shown
    assert ids(alice, chain_id=tag, key=alice_key.id) == [ra]
    assert ids(ADMIN, chain_id=tag) == [rb, ra]  # newest first
    assert ids(ADMIN, chain_id=tag, key=bob_key.id) == [rb]
    assert ids(ADMIN, client_request_id="same-id", order="asc") == [ra, rb]
    for path in ("/qtrap/v1/requests", "/qtrap/v1/usage"):
        r = setup.get(path, alice, params={"key": bob_key.id})  # another key's records: refused
        assert r.status_code == 403, path
        assert r.json()["error"]["code"] == "permission_denied" and r.json()["error"]["param"] == "key"
        assert setup.get(path).status_code == 401
    usage = setup.get("/qtrap/v1/usage", alice, params={"group_by": "key,precision", "chain_id": tag}).json()
    assert [(g["key"], g["precision"], g["requests"]) for g in usage["groups"]] == [(alice_key.id, "bf16", 1)]
    every = setup.get("/qtrap/v1/usage", ADMIN, params={"group_by": "key", "chain_id": tag}).json()
    assert sorted(g["key"] for g in every["groups"]) == sorted([alice_key.id, bob_key.id])
    assert every["total"]["requests"] == 2 and every["total"]["energy_j"] > 0


def test_the_new_routes_under_auth(setup: Setup) -> None:
    _, alice = setup.alice
    _, carol = setup.carol
    # probes carry no key
    assert setup.get("/health/live").status_code == 200
    assert setup.get("/health/ready").status_code == 200
    # a model entry: a key sees its pools only; another pool is not found
    assert setup.get("/v1/models/qwen3-8b@bf16", alice).json()["root"] == "qwen3-8b"
    assert setup.get("/v1/models/qwen3-8b", carol).status_code == 404
    assert setup.get("/v1/models/qwen3-8b").status_code == 401
    # the passthrough and embeddings routes are serving routes: a client key, within its pools
    tok = {"model": "qwen3-8b", "prompt": "a b c"}
    assert setup.post("/tokenize", None, tok).status_code == 401
    assert setup.post("/tokenize", carol, tok).status_code == 403
    r = setup.post("/tokenize", alice, tok)
    assert r.status_code == 200 and r.json()["count"] == 3
    emb = {"model": "qwen3-8b", "input": "one two"}
    assert setup.post("/v1/embeddings", None, emb).status_code == 401
    r = setup.post("/v1/embeddings", alice, emb)
    assert r.status_code == 200, r.text
    q = r.json()["usage"]["qtrap"]
    # the record_url in usage is readable with the key that made the request, not with another
    assert setup.get(q["record_url"], alice).json()["id"] == q["request_id"]
    assert setup.get(q["record_url"], carol).status_code == 404


def test_loadgen_drives_a_proxy_with_auth_on_and_keeps_the_keys_out_of_its_report(
    setup: Setup, tmp_path: Path
) -> None:
    """`python -m loadgen --proxy URL --api-key K --admin-key A`: its requests are the key's, its records
    and the energy counters are read back, and neither key appears in anything it writes."""
    key, secret = setup.store.create("loadgen")
    out = tmp_path / "lg"
    env = {k: v for k, v in os.environ.items() if k not in ("QTRAP_API_KEY", "QTRAP_ADMIN_KEY")}
    cmd = [sys.executable, "-m", "loadgen", "--proxy", setup.url, "--model", "qwen3-8b", "--precisions", "bf16",
           "--concurrency", "1", "--num-chains", "2", "--warmup", "0", "--bootstrap", "50", "--quiet",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run([*cmd, "--api-key", secret, "--admin-key", ADMIN], capture_output=True, text=True,
                          timeout=180, env=env, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    [level] = report["levels"]
    assert level["errors"] == 0 and level["energy_j"] > 0  # its own records, read back final
    assert report["energy"]["null_reason"] is None and report["energy"]["devices"]  # the admin routes
    assert "--api-key REDACTED --admin-key REDACTED" in report["context"]["command_line"]
    for f in out.rglob("*"):
        if f.is_file():
            text = f.read_bytes()
            assert secret.encode() not in text and ADMIN.encode() not in text, f
    mine = setup.get(f"/qtrap/v1/requests?key={key.id}&limit=1000", ADMIN).json()["data"]
    assert len(mine) >= level["window_requests"] and {r["key_id"] for r in mine} == {key.id}
    # the same through the environment; a client key alone is refused the admin routes, so the run has
    # no measured energy (null, with the proxy's refusal as the reason) but still its records
    env_run = subprocess.run([*cmd[:-1], str(tmp_path / "lg2")], capture_output=True, text=True, timeout=180,
                             env={**env, "QTRAP_API_KEY": secret}, check=False)  # fmt: skip
    assert env_run.returncode == 0, env_run.stderr
    alone = json.loads((tmp_path / "lg2" / "report.json").read_text())
    assert alone["levels"][0]["energy_j"] > 0 and alone["levels"][0]["errors"] == 0
    assert alone["energy"]["devices"] == [] and alone["energy"]["null_reason"]
    assert "refused GET /qtrap/v1/energy (HTTP 403)" in env_run.stderr and "--admin-key" in env_run.stderr
    # keys go to a running proxy only
    bad = subprocess.run([sys.executable, "-m", "loadgen", "--api-key", secret], capture_output=True, text=True,
                         timeout=60, env=env, check=False)  # fmt: skip
    assert bad.returncode == 2 and "need --proxy" in bad.stderr.strip().splitlines()[-1]
    assert secret not in bad.stderr
