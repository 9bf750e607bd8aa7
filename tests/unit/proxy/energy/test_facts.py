"""Engine facts: placing an engine's span or headers on the proxy's clock, the clock offset, and
attribution that uses them (queue without work, the prefill where it ran, a non-streaming answer's
decode), waiting for them and giving up."""

from __future__ import annotations

import math
import random

import pytest

from qtrap_proxy.energy import reasons
from qtrap_proxy.energy.attribution import DeviceAccount, Tracked, _union_length
from qtrap_proxy.energy.facts import ClockOffset, EngineFacts, EngineTimes, header_times, otlp_times
from qtrap_proxy.timeline import Timeline


def _tl(
    rid: str,
    start: float,
    end: float | None,
    chunks: list[tuple[float, int]],
    prompt: int | None,
    stream: bool,
):
    tl = Timeline(rid, "chat", stream=stream, start=start, start_unix_s=1_000_000.0 + start)
    for t, n in chunks:
        tl.add_chunk(t, n)
    tl.prompt_tokens = prompt
    tl.completion_tokens = sum(n for _, n in chunks) if chunks else None
    tl.end = end
    return tl


# -- the clock offset ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("skew", [0.0, 3.25, -120.0])
def test_clock_offset_converges_to_the_skew_within_its_bound(skew: float) -> None:
    """Requests with random overheads between proxy and engine (0.2-8 ms each way): every estimate's
    bound covers the true skew, and after 200 requests the bound is under a millisecond."""
    rng = random.Random(7)
    clock = ClockOffset()
    for i in range(200):
        send = 10.0 * i
        up, down, work = rng.uniform(2e-4, 8e-3), rng.uniform(2e-4, 8e-3), rng.uniform(0.05, 2.0)
        arrival_engine = send + up + skew
        end_proxy = send + up + work + down
        clock.add(arrival_engine + work - end_proxy, arrival_engine - send)
        est = clock.estimate()
        assert est is not None
        offset, half = est
        assert abs(offset - skew) <= half + 1e-9
    assert half < 1e-3
    assert clock.restarts == 0


def test_clock_offset_restarts_when_the_engine_clock_steps() -> None:
    clock = ClockOffset()
    for i in range(20):
        clock.add(-0.01 + 1e-4 * (i % 3), 0.01 - 1e-4 * (i % 5))
    for _ in range(3):
        clock.add(4.99, 5.01)  # the engine's clock stepped 5 s forward
    est = clock.estimate()
    assert est is not None and est[0] == pytest.approx(5.0) and est[1] == pytest.approx(0.01)
    assert clock.restarts == 1


# -- placing a span -------------------------------------------------------------------------------------------
def _span(arrival: float, **kw: float | int) -> EngineFacts:
    return EngineFacts(source="otlp", arrival_unix_s=arrival, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("skew", [0.0, 2.5, -7.0])
def test_a_span_lands_where_the_engine_ran_it_whatever_the_engine_clock_says(skew: float) -> None:
    """A non-streaming request at proxy monotonic 5.0 (wall 1,000,005.0): 0.3 s queued, 0.2 s prefill,
    1.0 s decode, answered 2 ms later. Its span, stamped by an engine clock ``skew`` off, lands there
    within the bound the clock gives."""
    tl = _tl("a" * 32, 5.0, 6.502 + 0.001, [], 100, stream=False)
    arrival_engine = 1_000_005.0 + 0.001 + skew
    facts = _span(
        arrival_engine,
        queue_s=0.3,
        prefill_s=0.2,
        ttft_s=0.5,
        decode_s=1.0,
        e2e_s=1.5,
        prompt_tokens=100,
        completion_tokens=50,
    )
    clock = ClockOffset()
    times = otlp_times(facts, tl.start, tl.start_unix_s, tl.end, None, clock)
    assert times is not None
    err = times.clock_error_s
    assert err <= 0.0021  # the request's own bounds: its proxy-side overheads, 3 ms in all
    assert times.queued == pytest.approx(5.001, abs=err + 1e-9)
    assert times.prefill_start == pytest.approx(5.301, abs=err + 1e-9)
    assert times.first_token == pytest.approx(5.501, abs=err + 1e-9)
    assert times.last_token == pytest.approx(6.501, abs=err + 1e-9)
    assert (times.prompt_tokens, times.completion_tokens) == (100, 50)


def test_a_span_without_its_first_token_time_or_prefill_cannot_be_placed() -> None:
    clock = ClockOffset()
    assert otlp_times(_span(1_000_000.0, e2e_s=1.0), 0.0, 1_000_000.0, 1.0, None, clock) is None
    assert (
        otlp_times(EngineFacts(source="otlp", ttft_s=0.1, prefill_s=0.1), 0.0, 1e6, 1.0, None, clock) is None
    )


def test_tgi_headers_anchor_at_the_answer() -> None:
    times = header_times(
        {
            "x-queue-time": "250",
            "x-inference-time": "1500",
            "x-prompt-tokens": "40",
            "x-generated-tokens": "30",
        },
        start=10.0,
        answer_at=12.0,
    )
    assert times is not None and times.source == "headers" and times.first_token is None
    assert (times.queued, times.prefill_start, times.last_token) == pytest.approx((10.25, 10.5, 12.0))
    assert (times.prompt_tokens, times.completion_tokens) == (40, 30)
    # nonsense is not believed: no inference time, no facts; bad counts are dropped
    assert header_times({"x-queue-time": "5"}, 0.0, 1.0) is None
    assert header_times({"x-inference-time": "nan"}, 0.0, 1.0) is None
    odd = header_times(
        {"x-inference-time": "100", "x-prompt-tokens": "-3", "x-generated-tokens": "1e99"}, 0.0, 1.0
    )
    assert odd is not None and odd.prompt_tokens is None and odd.completion_tokens is None


# -- attribution with facts -----------------------------------------------------------------------------------
def _times(
    queued: float, prefill: float, first: float | None, last: float, prompt: int, gen: int
) -> EngineTimes:
    return EngineTimes("otlp", queued, prefill, first, last, prompt, gen, 0.0)


def test_queued_time_gets_no_work_and_the_prefill_lands_where_it_ran() -> None:
    """b waits 1 s in the queue behind a, then prefills 1,000 tokens in 0.1 s. Without facts its prefill is
    spread from its arrival to its first chunk, so it takes most of the first second; with them it takes
    nothing of that second and nearly all of the 0.1 s where its prefill ran."""
    shares = {}
    for with_facts in (False, True):
        acc = DeviceAccount("h:0", settle_s=0.0, prefill_weight=0.1)
        a = Tracked(_tl("a", 0.0, 3.0, [(0.1 * k, 1) for k in range(1, 31)], 10, stream=True))
        b = Tracked(_tl("b", 0.0, 3.0, [(1.1 + 0.1 * k, 1) for k in range(0, 19)], 1000, stream=True))
        if with_facts:
            b.engine = _times(0.0, 1.0, 1.1, 2.9, 1000, 19)
        for tr in (a, b):
            acc.track(tr)
        acc.on_reading(0.0, 0.0)
        acc.on_reading(1.0, 100.0)
        acc.settle(10.0)
        first = b.energy_j
        acc.on_reading(1.1, 200.0)
        acc.settle(10.0)
        shares[with_facts] = (first, b.energy_j - first)
        assert a.energy_j + b.energy_j + acc.idle_j == pytest.approx(200.0)
        assert b.facts == ("engine" if with_facts else "proxy")
    # without facts: b's 100 prefill units spread over (0, 1.1], 1/1.1 of them in (0, 1], against a's 10 tokens
    # and its own prefill (0.1 x 10 prompt tokens)
    wb = 100.0 / 1.1
    assert shares[False][0] == pytest.approx(100.0 * wb / (wb + 11.0))
    # with facts: nothing while queued; in (1, 1.1] its 100 prefill units and its first token against a's one
    assert shares[True][0] == 0.0
    assert shares[True][1] == pytest.approx(100.0 * 101.0 / 102.0)


def test_queue_interval_shares_by_facts() -> None:
    """The same two requests, the first interval alone: with facts b (queued) gets nothing of it."""
    acc = DeviceAccount("h:0", settle_s=0.0, prefill_weight=0.1)
    a = Tracked(_tl("a", 0.0, 1.5, [(0.1 * k, 1) for k in range(1, 16)], 10, stream=True))
    b = Tracked(_tl("b", 0.0, 1.5, [(1.1, 1), (1.2, 1)], 1000, stream=True))
    b.engine = _times(0.0, 1.0, 1.1, 1.2, 1000, 2)
    for tr in (a, b):
        acc.track(tr)
    for t, j in [(0.0, 0.0), (1.0, 100.0)]:
        acc.on_reading(t, j)
    acc.settle(10.0)
    assert b.energy_j == 0.0 and a.energy_j == pytest.approx(100.0)


def test_non_streaming_tokens_spread_over_the_decode_only() -> None:
    """A non-streaming request queued 1 s, prefill 0.5 s, decode 0.5 s: without facts its work is spread over
    its 2 s; with them none falls in the queue, and its 40 tokens fall in the decode."""
    tl = _tl("n", 0.0, 2.0, [], 100, stream=False)
    tl.completion_tokens = 41
    tr = Tracked(tl)
    assert tr.work(0.0, 1.0, 0.1) == pytest.approx((41 + 10) / 2)
    tr.engine = _times(0.0, 1.0, 1.5, 2.0, 100, 41)
    assert tr.work(0.0, 1.0, 0.1) == 0.0
    assert tr.work(1.0, 1.5, 0.1) == pytest.approx(10.0 + 1.0)  # the prefill, closed by the first token
    assert tr.work(1.5, 2.0, 0.1) == pytest.approx(40.0)
    assert tr.work(1.75, 2.0, 0.1) == pytest.approx(20.0)
    # TGI: no first-token time, all rows over the inference
    tr.engine = EngineTimes("headers", 0.0, 1.0, None, 2.0, 100, 41, 0.001)
    assert tr.work(0.0, 1.0, 0.1) == 0.0
    assert tr.work(1.0, 1.5, 0.1) == pytest.approx((10 + 41) / 2)


def test_intervals_wait_for_expected_facts_then_give_up_with_the_reason() -> None:
    acc = DeviceAccount("h:0", settle_s=30.0, prefill_weight=0.1)
    tr = Tracked(_tl("n", 0.0, 1.0, [], 100, stream=False), facts_expected=True, facts_wait_s=2.0)
    tr.tl.completion_tokens = 10
    acc.track(tr)
    for t, j in [(0.0, 0.0), (0.5, 50.0), (1.2, 120.0)]:
        acc.on_reading(t, j)
    assert acc.settle(now=1.5) == []  # ended, span not in: waits
    assert len(acc.pending) == 2
    assert acc.settle(now=3.5) == [tr]  # 2 s past the end: its own view, and says why
    assert tr.facts == "proxy" and tr.facts_reason == reasons.FACTS_NEVER_CAME
    assert tr.energy_j == pytest.approx(100.0)


def test_a_span_that_comes_in_time_is_used_and_a_stream_waits_only_before_its_first_chunk() -> None:
    acc = DeviceAccount("h:0", settle_s=30.0, prefill_weight=0.1)
    tr = Tracked(
        _tl("s", 0.0, None, [(0.4, 1), (0.6, 1), (0.8, 1)], 100, stream=True),
        facts_expected=True,
        facts_wait_s=5.0,
    )
    acc.track(tr)
    for t, j in [(0.0, 0.0), (0.3, 30.0), (0.5, 50.0), (0.7, 70.0)]:
        acc.on_reading(t, j)
    acc.settle(now=0.75)
    assert len(acc.pending) == 3  # (0, 0.3] precedes its first chunk: everything waits behind it
    tr.engine = _times(0.0, 0.2, 0.4, 0.9, 100, 4)
    acc.settle(now=0.75)
    assert len(acc.pending) == 0  # (0.5, 0.7] follows the first chunk: never needed the span
    assert tr.facts == "engine" and tr.facts_reason is None


def test_settling_before_the_span_marks_the_request_as_the_proxys_view() -> None:
    acc = DeviceAccount("h:0", settle_s=1.0, prefill_weight=0.1)
    tr = Tracked(_tl("s", 0.0, None, [(0.4, 1)], 100, stream=True), facts_expected=True, facts_wait_s=5.0)
    acc.track(tr)
    for t, j in [(0.0, 0.0), (0.3, 30.0)]:
        acc.on_reading(t, j)
    acc.settle(now=1.4)  # settle_s after the interval's end: split without the span
    assert not acc.pending
    tr.engine = _times(0.0, 0.2, 0.4, 0.9, 100, 4)  # too late for (0, 0.3]
    assert tr.facts == "proxy" and tr.facts_reason == reasons.FACTS_TOO_LATE


def test_compare_views_keeps_both_figures_and_each_conserves() -> None:
    acc = DeviceAccount("h:0", settle_s=0.0, prefill_weight=0.1, compare_views=True)
    a = Tracked(_tl("a", 0.0, 1.1, [(0.1 * k, 1) for k in range(1, 12)], 10, stream=True))
    b = Tracked(_tl("b", 0.0, 1.1, [(1.1, 1)], 1000, stream=True))
    b.engine = _times(0.0, 1.0, 1.1, 1.1, 1000, 1)
    for tr in (a, b):
        acc.track(tr)
    for t, j in [(0.0, 0.0), (1.0, 100.0), (1.1, 200.0)]:
        acc.on_reading(t, j)
    acc.settle(10.0)
    assert b.energy_j < b.proxy_view_j  # the proxy's view gives b the queue it waited in
    assert a.energy_j + b.energy_j == pytest.approx(a.proxy_view_j + b.proxy_view_j)
    assert a.energy_j + b.energy_j + acc.idle_j == pytest.approx(200.0)


# -- the shared work model -----------------------------------------------------------------------------------
def test_the_shared_rows_fit_recovers_its_parts() -> None:
    """Shared power, a prompt row, a decoded token by the batch it was made in, a KV read: each recovered from
    intervals that mix them."""
    from qtrap_proxy.energy.attribution import SharedRowsFit

    rng = random.Random(3)
    fit = SharedRowsFit()
    for _ in range(SharedRowsFit.MIN_INTERVALS - 1):
        fit.add(0.1, 50.0, 200.0 * 0.1 + 0.05 * 50.0)
    assert fit.estimate() is None  # too few intervals to say
    per_decoded = {1.0: 0.30, 2.5: 0.10, 5.0: 0.02, 40.0: 0.01}  # J per decoded token at each batch
    for _ in range(400):
        busy, batch = rng.uniform(0.05, 0.12), rng.choice(list(per_decoded))
        prompt = rng.choice([0.0, 0.0, 16.0, 2000.0]) * rng.uniform(0.5, 1.5)
        decoded = batch * busy / 0.02 * rng.uniform(0.8, 1.2)  # a step of about 20 ms
        kv = (prompt + decoded) * rng.uniform(10.0, 3000.0)
        energy = 200.0 * busy + 0.05 * prompt + per_decoded[batch] * decoded + 2e-6 * kv
        fit.add(busy, prompt + decoded, energy, kv, decoded, batch)
    est = fit.estimate()
    assert est is not None
    assert est.shared_power_w == pytest.approx(200.0, rel=1e-4)
    assert est.prefill_row_j == pytest.approx(0.05, rel=1e-4)
    assert est.decode_row_j == pytest.approx(tuple(per_decoded.values()), rel=1e-4)
    assert est.kv_read_j == pytest.approx(2e-6, rel=1e-4)
    assert [est.decode_row_at(b) for b in (1.0, 1.4, 1.6, 3.4, 3.6, 7.4, 7.6, 64.0)] == pytest.approx(
        [0.30, 0.30, 0.10, 0.10, 0.02, 0.02, 0.01, 0.01], rel=1e-4
    )
    # energy that does not grow with rows or reads: all of it is the shared part, none negative
    flat = SharedRowsFit()
    for _ in range(50):
        busy, rows = rng.uniform(0.05, 0.12), rng.uniform(1.0, 100.0)
        flat.add(busy, rows, 300.0 * busy - 1e-3 * rows, rows * 100.0, rows / 2, rng.choice([1.0, 3.0, 9.0]))
    est = flat.estimate()
    assert est is not None
    assert est.shared_power_w > 0
    assert est.prefill_row_j == 0.0 and est.kv_read_j == 0.0 and set(est.decode_row_j) == {0.0}


def test_the_non_negative_least_squares_meets_its_optimality_conditions() -> None:
    """Lawson-Hanson on random problems, unknowns at very different scales: x >= 0; where x > 0 the gradient
    is zero, where x = 0 it does not point into the feasible side (KKT); and it is never worse than any
    single unknown alone or the unconstrained solution made non-negative."""
    from qtrap_proxy.energy.attribution import _nnls_normal

    rng = random.Random(11)
    for _ in range(200):
        k = rng.randint(2, 7)
        scale = [10.0 ** rng.uniform(-3, 4) for _ in range(k)]
        truth = [rng.choice([0.0, rng.uniform(-1.0, 2.0)]) / sc for sc in scale]
        s = [[0.0] * k for _ in range(k)]
        c = [0.0] * k
        for _ in range(rng.randint(k, 40)):
            x = [rng.uniform(0.0, 1.0) * sc for sc in scale]
            y = sum(xi * ti for xi, ti in zip(x, truth, strict=True)) + rng.gauss(0.0, 0.1)
            for i in range(k):
                c[i] += x[i] * y
                for j in range(k):
                    s[i][j] += x[i] * x[j]
        b = _nnls_normal(s, c)

        def loss(v: list[float], s: list[list[float]] = s, c: list[float] = c) -> float:
            n = len(c)
            return sum(v[i] * s[i][j] * v[j] for i in range(n) for j in range(n)) - 2 * sum(
                v[i] * c[i] for i in range(n)
            )

        if b is None:  # only when no unknown can lower the loss from zero
            assert all(c[i] <= 1e-9 * math.sqrt(s[i][i]) for i in range(k))
            continue
        assert all(v >= 0 for v in b)
        for i in range(k):
            grad = (c[i] - sum(s[i][j] * b[j] for j in range(k))) / math.sqrt(s[i][i])
            if b[i] > 0:
                assert abs(grad) <= 1e-6 * (1 + abs(c[i]) / math.sqrt(s[i][i]))
            else:
                assert grad <= 1e-6 * (1 + abs(c[i]) / math.sqrt(s[i][i]))
        for i in range(k):  # one unknown alone, at its best non-negative value
            alone = [0.0] * k
            alone[i] = max(0.0, c[i] / s[i][i])
            assert loss(b) <= loss(alone) + 1e-9 * abs(loss(alone))


def test_the_shared_model_splits_an_interval_by_running_time_and_rows() -> None:
    """Once the fit knows the device (200 W shared, 0.05 J per row; steps whose length does not grow with
    reads or prompt rows), an interval of 0.1 s where a prefills 990 prompt rows (+1 token) in its last half
    while b decodes 10 tokens throughout: 20 J shared by the time each ran, split equally where both ran (b
    had the first 0.05 s alone: a gets 0.025 s of the 0.1 s), 50 J by rows; a gets 5 + 50 * 991 / 1001 J."""
    acc = DeviceAccount("h:0", settle_s=0.0, prefill_weight=0.1, work_model="shared")
    for _ in range(100):  # what the device has shown so far (no attention cost; decoded tokens at batch 2-3)
        acc.fit.add(0.1, 100.0, 200.0 * 0.1 + 0.05 * 100.0, 5000.0)
        acc.fit.add(0.05, 1000.0, 200.0 * 0.05 + 0.05 * 1000.0, 9000.0)
        acc.fit.add(0.08, 200.0, 200.0 * 0.08 + 0.05 * 200.0, 0.0, 200.0, 2.0)
        acc.fit.add(0.1, 50.0, 200.0 * 0.1 + 0.05 * 50.0, 0.0, 50.0, 3.0)
    est = acc.fit.estimate()
    assert est is not None and est.kv_read_s == 0.0 and est.prefill_row_s == 0.0
    a = Tracked(_tl("a", 0.0, 1.2, [(1.1, 1)], 990, stream=True))
    a.engine = _times(0.0, 1.05, 1.1, 1.1, 990, 1)
    b = Tracked(_tl("b", 0.0, 1.2, [(1.0 + 0.01 * k, 1) for k in range(1, 12)], 10, stream=True))
    b.engine = _times(0.0, 0.0, 0.01, 1.11, 10, 11)
    for tr in (a, b):
        acc.track(tr)
    acc.on_reading(1.0, 0.0)
    acc.on_reading(1.1, 70.0)  # 20 J shared + 0.05 J x 1,000 rows
    acc.settle(10.0)
    rows_a, rows_b = 990.0 + 1.0, 10.0
    f = 20.0 / 70.0
    assert a.energy_j == pytest.approx(
        70.0 * (f * 0.025 / 0.1 + (1 - f) * rows_a / (rows_a + rows_b)), rel=0.01
    )
    assert a.energy_j + b.energy_j == pytest.approx(70.0)


def test_time_shares_split_each_moment_equally_among_the_requests_running() -> None:
    """0-1 s: a alone; 1-3 s: a, b and c; 3-4 s: c alone; d never ran."""
    from qtrap_proxy.energy.attribution import _time_shares

    shares = _time_shares([(0.0, 3.0), (1.0, 3.0), (1.0, 4.0), (2.0, 2.0)])
    assert shares == pytest.approx([1.0 + 2.0 / 3, 2.0 / 3, 2.0 / 3 + 1.0, 0.0])
    assert sum(shares) == pytest.approx(4.0)  # the union of the spans
    assert _time_shares([]) == [] and _time_shares([(1.0, 0.5)]) == [0.0]
    rng = random.Random(5)
    for _ in range(50):  # any spans: non-negative, summing to their union, equal spans equal shares
        spans = [(lo, lo + rng.uniform(-0.1, 1.0)) for lo in (rng.uniform(0.0, 2.0) for _ in range(8))]
        spans.append(spans[0])
        got = _time_shares(spans)
        assert all(x >= 0 for x in got) and got[0] == pytest.approx(got[-1])
        assert sum(got) == pytest.approx(_union_length(spans))


def test_the_time_reads_and_prompt_rows_add_goes_to_them() -> None:
    """A device whose steps last 20 ms plus 0.1 us per KV read plus 20 us per prompt row prefilled, at 400 W
    whatever runs (the energy has no part per read or row beyond the time they add): the busy-time fit finds
    both times, and in an interval where a reads 20 times what b reads, a pays for the time its reads took;
    where the fit also finds energy per read beyond that time, the reads' part is the larger of the two."""
    from qtrap_proxy.energy.attribution import SharedRowsFit

    rng = random.Random(8)
    acc = DeviceAccount("h:0", settle_s=0.0, prefill_weight=1.0, work_model="shared")
    for _ in range(400):
        batch = rng.uniform(1.0, 20.0)
        steps = rng.uniform(3.0, 6.0)
        decoded = batch * steps
        kv = decoded * rng.uniform(50.0, 3000.0)
        prompt = rng.choice([0.0, 0.0, 500.0]) * rng.uniform(0.5, 1.5)
        busy = 0.02 * steps + 1e-7 * kv + 2e-5 * prompt
        acc.fit.add(busy, prompt + decoded, 400.0 * busy, kv, decoded, batch)
    est = acc.fit.estimate()
    assert est is not None
    assert est.kv_read_s == pytest.approx(1e-7, rel=0.02)
    assert est.prefill_row_s == pytest.approx(2e-5, rel=0.02)
    assert est.shared_power_w == pytest.approx(400.0, rel=0.01)

    # both decode one token per 20 ms step for 0.1 s at 400 W (40 J); a's context is 20,000 tokens, b's 1,000
    def pair(acc: DeviceAccount) -> tuple[Tracked, Tracked]:
        out = []
        for rid, prompt in (("a", 20_000), ("b", 1_000)):
            tr = Tracked(_tl(rid, 0.0, 1.2, [(1.0 + 0.02 * k, 1) for k in range(1, 6)], prompt, stream=True))
            tr.engine = _times(0.0, 0.0, 0.01, 1.1, prompt, 5)
            tr.tl.completion_tokens = 5
            acc.track(tr)
            out.append(tr)
        acc.on_reading(1.0, 0.0)
        acc.on_reading(1.1, 40.0)
        acc.settle(10.0)
        return out[0], out[1]

    reads = [tr.rows_and_kv(1.0, 1.1)[1] for tr in pair(DeviceAccount("x:0"))]  # type: ignore[index]
    a, b = pair(acc)
    assert a.energy_j + b.energy_j == pytest.approx(40.0)
    # the reads' time (about 10.5 ms of the 100) at 400 W is the readers'; the rest is shared equally
    tau = 1e-7
    assert a.energy_j == pytest.approx(
        400.0 * (0.1 - tau * sum(reads)) / 2 + 400.0 * tau * reads[0], rel=0.02
    )
    assert a.energy_j / b.energy_j > 1.15
    # a device whose reads also cost energy beyond their time (the fit's own figure, 100 uJ per read, above
    # the 40 uJ their time costs at 400 W): the reads' part is the larger of the two, never both
    rich = DeviceAccount("h:0", settle_s=0.0, prefill_weight=1.0, work_model="shared")
    for _ in range(400):
        batch, steps = rng.uniform(1.0, 20.0), rng.uniform(3.0, 6.0)
        decoded = batch * steps
        kv = decoded * rng.uniform(50.0, 3000.0)
        busy = 0.02 * steps + 1e-7 * kv
        rich.fit.add(busy, decoded, 400.0 * busy + 1e-4 * kv, kv, decoded, batch)
    est = rich.fit.estimate()
    assert est is not None and est.kv_read_j == pytest.approx(1e-4, rel=1e-3)
    a3, b3 = pair(rich)
    assert a3.energy_j + b3.energy_j == pytest.approx(40.0)
    k_all = sum(reads)
    parts = (400.0 * (0.1 - tau * k_all), 1e-4 * k_all)  # the shared part, the reads' part
    want_a = 40.0 * (parts[0] / 2 + parts[1] * reads[0] / k_all) / sum(parts)
    assert a3.energy_j == pytest.approx(want_a, rel=0.02)
    # without the busy-time fit's figures (no decoded tokens seen) the same interval is split equally
    plain = DeviceAccount("h:0", settle_s=0.0, prefill_weight=1.0, work_model="shared")
    for _ in range(SharedRowsFit.MIN_INTERVALS):
        plain.fit.add(0.1, 10.0, 40.0, 1000.0)
    a2, b2 = pair(plain)
    assert a2.energy_j == pytest.approx(b2.energy_j, rel=0.01)


def test_a_time_the_meter_cannot_tell_apart_is_shrunk_to_nothing() -> None:
    """Busy time that does not depend on the reads at all (noise of 10% per interval): the fit's KV-read time
    is within its standard errors of zero, the shrunk figure is below the raw one, and the time it would move
    to the readers of a typical interval is under 2% of that interval."""
    from qtrap_proxy.energy.attribution import SharedRowsFit, _shrunk

    rng = random.Random(2)
    fit = SharedRowsFit()
    for _ in range(300):
        steps = rng.uniform(3.0, 6.0)
        kv = 5 * steps * rng.uniform(100.0, 3000.0)
        busy = 0.02 * steps * rng.gauss(1.0, 0.1)
        fit.add(busy, 5 * steps, 400.0 * busy, kv, 5 * steps, 5.0)
    raw = fit.time.solve()
    assert raw is not None
    se = fit.time.standard_errors(raw)
    est = fit.estimate()
    assert est is not None
    if raw[-2] > 0:
        assert raw[-2] < 3 * se[-2]
        assert est.kv_read_s == pytest.approx(_shrunk(raw[-2], se[-2])) and est.kv_read_s < 0.9 * raw[-2]
        assert est.kv_read_s * 5 * 4.5 * 1550.0 < 0.02 * 0.02 * 4.5
    else:
        assert est.kv_read_s == 0.0
    assert _shrunk(1.0, 0.0) == 1.0 and _shrunk(1.0, 1.0) == 0.5 and _shrunk(0.0, 1.0) == 0.0
    assert _shrunk(1.0, math.inf) == 0.0


# -- the service joins spans to requests ------------------------------------------------------------------------
def _service():  # type: ignore[no-untyped-def]
    from qtrap_proxy.config import load_config
    from qtrap_proxy.energy.service import EnergyService
    from qtrap_proxy.upstream import Backend

    cfg = load_config(
        data={
            "backends": [
                {"name": "v", "pool": "p", "precision": "bf16", "url": "http://127.0.0.1:9", "model": "m",
                 "devices": [{"host": "h", "index": 0}], "engine_facts": "otlp"},
                {"name": "plain", "pool": "p", "precision": "fp8", "url": "http://127.0.0.1:9", "model": "m",
                 "devices": [{"host": "h", "index": 0}]},
            ],
            "meter": {"kind": "dcgm", "urls": ["http://127.0.0.1:9/metrics"]},
            "otlp_receiver": {"enabled": True, "port": 0},
        }
    )  # fmt: skip
    backends = [Backend(b) for b in cfg.backends]
    return EnergyService(cfg, backends, lambda tr: None), backends


def test_a_span_that_arrives_before_the_proxy_sees_the_end_joins_and_bounds_the_clock() -> None:
    """The engine records its span when the request finishes there, which can be before the proxy has read
    the last bytes: the span joins the open account, placed by the offset the first chunk bounds."""
    from qtrap_proxy.timeline import new_request_id

    svc, (vb, plain) = _service()
    tl = Timeline(new_request_id(), "chat", stream=True, start=100.0, start_unix_s=1_700_000_100.0)
    tl.backend = vb.name
    tr = svc.begin(tl, vb, hop_split=False)
    assert tr.facts_expected and tr.facts_wait_s == 6.0
    tl.add_chunk(100.31, 1)  # the first chunk; the stream goes on
    arrival = 1_700_000_100.0 + 0.01 + 5.0  # the engine's clock is 5 s ahead
    svc.on_facts(
        [
            EngineFacts(
                "otlp", trace_id=tl.request_id, parent_span_id=tl.span_id, arrival_unix_s=arrival, queue_s=0.1,
                prefill_s=0.2, ttft_s=0.3, decode_s=0.5, e2e_s=0.8, prompt_tokens=7, completion_tokens=20,
            )
        ]
    )  # fmt: skip
    assert svc.facts_outcomes["joined"] == 1 and tr.engine is not None
    clock = svc.clocks["v"].estimate()
    assert clock is not None and clock[0] + clock[1] >= 5.0 - 0.01 and clock[0] - clock[1] <= 5.0
    assert tr.engine.first_token == pytest.approx(100.31, abs=0.011)
    # a second span for it, one for a request never sent, and one by request id for a backend without facts
    svc.on_facts(
        [EngineFacts("otlp", parent_span_id=tl.span_id, arrival_unix_s=arrival, ttft_s=0.3, prefill_s=0.1)]
    )
    svc.on_facts([EngineFacts("otlp", parent_span_id="0123456789abcdef", arrival_unix_s=arrival)])
    tl2 = Timeline(new_request_id(), "chat", stream=False, start=100.0, start_unix_s=1_700_000_100.0)
    tl2.backend = plain.name
    svc.begin(tl2, plain, hop_split=False)
    svc.on_facts([EngineFacts("otlp", request_id=f"chatcmpl-{tl2.request_id}", arrival_unix_s=arrival)])
    assert svc.facts_outcomes == {"joined": 1, "unmatched": 2, "duplicate": 1, "unplaceable": 0}


def test_a_span_that_cannot_be_placed_stops_the_wait_and_says_why() -> None:
    from qtrap_proxy.timeline import new_request_id

    svc, (vb, _) = _service()
    tl = Timeline(new_request_id(), "chat", stream=False, start=100.0, start_unix_s=1_700_000_100.0)
    tl.backend = vb.name
    tr = svc.begin(tl, vb, hop_split=False)
    svc.on_facts([EngineFacts("otlp", parent_span_id=tl.span_id, e2e_s=1.0)])  # no start time
    assert svc.facts_outcomes["unplaceable"] == 1
    assert not tr.facts_expected and tr.facts == "proxy" and tr.facts_reason == reasons.FACTS_UNPLACEABLE


def test_prompt_tokens_the_prefix_cache_held_are_no_prefill_rows_but_are_read() -> None:
    """A prompt of 1,000 tokens of which the engine's prefix cache held 900 (vLLM's
    usage.prompt_tokens_details.cached_tokens): its prefill puts 100 rows through the model, and its
    attention still reads all 1,000 once. Without the count all 1,000 are rows."""
    for cached, rows in ((None, 1000.0), (900, 100.0), (1000, 0.0)):
        tl = _tl("p", 0.0, 2.0, [(1.0, 1)], 1000, True)
        tl.cached_tokens = cached
        tr = Tracked(tl)
        tr.engine = EngineTimes("otlp", 0.0, 0.5, 1.0, 1.0, 1000, 1, 0.0)
        got = tr.rows_and_kv(0.5, 0.99)  # 98% of the prefill (0.5 to 1.0), before the first token
        assert got is not None
        assert got[0] == pytest.approx(0.98 * rows)
        assert got[1] == pytest.approx(0.98 * 1000.0 if rows else 0.0)  # all cached: no rows to scale
        # the proxy's own view (no engine facts) counts the same rows over arrival to first chunk
        assert tr.proxy_work(0.0, 1.0, 1.0) == pytest.approx(rows + 1)


def test_cached_tokens_from_usage_are_validated() -> None:
    from qtrap_proxy.openai_route import cached_tokens

    assert cached_tokens({"prompt_tokens_details": {"cached_tokens": 30}}, 100) == 30
    for bad in (
        {},
        {"prompt_tokens_details": None},
        {"prompt_tokens_details": {"cached_tokens": -1}},
        {"prompt_tokens_details": {"cached_tokens": 101}},
        {"prompt_tokens_details": {"cached_tokens": True}},
        {"prompt_tokens_details": {"cached_tokens": 3.0}},
    ):
        assert cached_tokens(bad, 100) is None
    tl = _tl("q", 0.0, 1.0, [], 50, True)
    assert tl.prefilled(50) == 50 and tl.prefilled(None) is None
    tl.cached_tokens = 20
    assert tl.prefilled(50) == 30 and tl.prefilled(10) == 0


def test_the_energy_route_reports_what_the_shared_model_learnt() -> None:
    """``work_fit`` in GET /qtrap/v1/energy: null figures before enough intervals, then the fit's parts and
    the busy time a read and a prompt row add; nothing for the rows model."""
    from qtrap_proxy.energy.service import _fit_report

    assert _fit_report(DeviceAccount("h:0", work_model="rows")) is None
    acc = DeviceAccount("h:0", work_model="shared")
    early = _fit_report(acc)
    assert early is not None and early["intervals"] == 0 and early["shared_power_w"] is None
    assert early["busy_s_per_kv_read"] is None and early["decode_batch_from"] == [1, 2, 4, 8]
    rng = random.Random(4)
    for _ in range(300):
        batch, steps = rng.uniform(1.0, 20.0), rng.uniform(3.0, 6.0)
        decoded = batch * steps
        kv = decoded * rng.uniform(50.0, 3000.0)
        prompt = rng.choice([0.0, 500.0]) * rng.uniform(0.5, 1.5)
        busy = 0.02 * steps + 1e-7 * kv + 2e-5 * prompt
        acc.fit.add(busy, prompt + decoded, 300.0 * busy + 1e-5 * kv, kv, decoded, batch)
    rep = _fit_report(acc)
    assert rep is not None and rep["intervals"] == 300
    assert rep["shared_power_w"] == pytest.approx(300.0, rel=1e-3)
    assert rep["energy_per_kv_read_j"] == pytest.approx(1e-5, rel=1e-3)
    assert rep["busy_s_per_kv_read"] == pytest.approx(1e-7, rel=1e-3)
    assert rep["busy_s_per_prompt_row"] == pytest.approx(2e-5, rel=1e-3)
    assert rep["energy_per_prompt_row_j"] == pytest.approx(0.0, abs=1e-9)


def test_the_fit_remembers_seconds_not_intervals() -> None:
    """The same minute of work seen through a meter of 100 ms and one of 20 ms intervals (each interval the
    same mix, so a finer meter only cuts it finer): after the device's shared power moves from 300 W to
    400 W for 20 s, both fits have moved by the same amount, part of the way (a memory of about 50 s)."""
    from qtrap_proxy.energy.attribution import SharedRowsFit

    ests = []
    for dt in (0.1, 0.02):
        fit = SharedRowsFit()
        for power, seconds in ((300.0, 60.0), (400.0, 20.0)):
            for i in range(round(seconds / dt)):
                rows = (50.0 + 40.0 * (i % 5)) * dt / 0.1
                kv = rows * (100.0 + 300.0 * (i % 3))
                fit.add(dt, rows, power * dt + 0.05 * rows + 1e-6 * kv, kv, 0.0, 1.0, dt)
        est = fit.estimate()
        assert est is not None
        ests.append(est.shared_power_w)
    assert ests[0] == pytest.approx(ests[1], rel=1e-3)
    assert 300.0 + 100.0 * 0.25 < ests[0] < 300.0 + 100.0 * 0.5  # 1 - e^(-20/50) = 0.33 of the way
