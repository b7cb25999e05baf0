"""Turning per-round results into the printed tables: medians, and ratios taken within each round."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

__all__ = ["Rounds", "extras_table", "main_table", "median_ratio", "targets"]

Rounds = list[dict[str, float]]  # one dict of metric -> value per round

# (key, label, format) of the head-to-head table.
_MAIN_METRICS = (
    ("drain", "backlog drain, msgs/s", "{:,.0f}"),
    ("live", "live producer, msgs/s", "{:,.0f}"),
    ("lat1_p50", "latency 1 in flight p50, ms", "{:.2f}"),
    ("lat1_p99", "latency 1 in flight p99, ms", "{:.2f}"),
    ("paced_p50", "latency @ paced rate p50, ms", "{:.2f}"),
    ("paced_p99", "latency @ paced rate p99, ms", "{:.2f}"),
    ("cpu_us", "node CPU per msg (drain), µs", "{:.1f}"),
    ("server_cpu_us", "nats-server CPU per msg (drain), µs", "{:.1f}"),
    ("vm_cpu_us", "VictoriaMetrics CPU per msg (drain), µs", "{:.1f}"),
    ("rss_idle", "node RSS idle after start, MB", "{:.1f}"),
    ("rss_after", "node RSS after the run, MB", "{:.1f}"),
)


def _median(rounds: Rounds, key: str) -> float | None:
    values = [r[key] for r in rounds if key in r]
    return statistics.median(values) if values else None


def median_ratio(numerator: Rounds, denominator: Rounds, key: str) -> float | None:
    """Median over rounds of numerator/denominator, each ratio from the same round."""
    ratios = [a[key] / b[key] for a, b in zip(numerator, denominator, strict=False) if key in a and b.get(key)]
    return statistics.median(ratios) if ratios else None


def _cell(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def main_table(reference: Rounds, kre: Rounds, paced_rate: int) -> str:
    head = f"{'metric (median of rounds)':<40} {'reference':>11} {'kre-runner':>11} {'kre/ref':>8}"
    lines = [head, "-" * len(head)]
    for key, label, fmt in _MAIN_METRICS:
        label = label.replace("paced rate", f"{paced_rate} msg/s")
        ratio = median_ratio(kre, reference, key)
        lines.append(f"{label:<40} {_cell(_median(reference, key), fmt):>11} {_cell(_median(kre, key), fmt):>11} "
                     f"{_cell(ratio, '{:.2f}'):>8}")
    return "\n".join(lines)


def _row(label: str, rounds: Rounds, ratio: float | None = None, meaning: str = "") -> str:
    """A variant's drain rate, its node CPU per message and the share of one core that makes."""
    ratio_cell = "" if ratio is None else _cell(ratio, "{:.2f}")
    busy = [r["drain"] * r["cpu_us"] / 1e6 for r in rounds if "cpu_us" in r]
    core = statistics.median(busy) if busy else None
    rate, cpu = _cell(_median(rounds, "drain"), "{:,.0f}"), _cell(_median(rounds, "cpu_us"), "{:.1f}")
    return f"{label:<44} {rate:>9} {cpu:>7} {_cell(core, '{:.0%}'):>6} {ratio_cell:>7}  {meaning}".rstrip()


def extras_table(kre: Rounds, extras: dict[str, Rounds], io_inflight: Sequence[int]) -> str:
    """kre-runner features priced against kre-runner itself, in the same rounds."""
    head = f"{'kre-runner variant (backlog drain)':<44} {'msgs/s':>9} {'µs/msg':>7} {'core':>6} {'ratio':>7}  meaning"
    lines = [head, "-" * (len(head) + 30), _row("sync handler (as above)", kre)]
    plain = extras.get("no_influx", [])
    if plain:
        lines.append(_row("without KRT_INFLUX_URI (no elapsed metrics)", plain, median_ratio(plain, kre, "drain"),
                          "of sync handler"))
    measured = extras.get("measured", [])
    ratio = median_ratio(measured, kre, "drain")
    cost = _cell(None if ratio is None else 1 - ratio, "{:.0%}")
    lines.append(_row("+ ctx.measurement.save once per message", measured, ratio, f"of sync handler (cost {cost})"))
    cpu_limit = extras.get("async", [])
    lines.append(_row("async handler, no I/O", cpu_limit))
    for n in io_inflight:
        rounds = extras.get(f"io{n}", [])
        ratio = median_ratio(rounds, _io_ideal(rounds, n), "drain")
        ceiling = _median(rounds, "asyncio")
        asyncio_cell = _cell(None if ceiling is None else ceiling / (n / 0.01), "{:.2f}")
        lines.append(_row(f"async 10 ms I/O, KRT_MAX_INFLIGHT={n}", rounds, ratio,
                          f"of min(CPU-bound rate, {n}/10 ms = {n * 100:,}/s); asyncio alone: {asyncio_cell} "
                          f"of {n}/10 ms; {_cell(median_ratio(rounds, cpu_limit, 'drain'), '{:.2f}')} of the "
                          f"no-I/O async rate"))
    return "\n".join(lines)


def _io_ideal(rounds: Rounds, n: int) -> Rounds:
    """Per round, what an I/O-bound node could reach: N/10 ms, unless its core is the limit first.

    The CPU-bound rate is 1 / (node CPU per message) of the same run: a handler that sleeps costs
    more CPU than one that does not (a timer, a future and a second task step), and that cost is
    the handler's, so the no-I/O async rate would understate what "CPU-bound" means here.
    """
    return [{"drain": min(1e6 / r["cpu_us"], n / 0.01)} for r in rounds if r.get("cpu_us")]


def _check(ok: bool | None) -> str:
    return "n/a " if ok is None else ("met " if ok else "MISS")


def targets(reference: Rounds, kre: Rounds, extras: dict[str, Rounds], io_inflight: Sequence[int]) -> str:
    lines = []
    drain = median_ratio(kre, reference, "drain")
    lines.append(f"[{_check(None if drain is None else drain >= 0.9)}] backlog drain ≥ 0.9 × reference "
                 f"(everything on, an elapsed-time point per message): {_cell(drain, '{:.2f}')}")
    plain = extras.get("no_influx", [])
    if plain:  # metrics and health are on in every kre-runner node here (KRT_HTTP_PORT)
        bare = median_ratio(plain, reference, "drain")
        lines.append(f"[{_check(None if bare is None else bare >= 0.9)}] backlog drain ≥ 0.9 × reference with "
                     f"metrics and health on, no elapsed-time points: {_cell(bare, '{:.2f}')}")
        kept = median_ratio(kre, plain, "drain")
        lines.append(f"[{_check(None if kept is None else kept >= 0.95)}] the elapsed-time point costs ≤ 5 % of "
                     f"the drain: {_cell(None if kept is None else 1 - kept, '{:.1%}')}")
    p99 = _median(kre, "paced_p99")
    lines.append(f"[{_check(None if p99 is None else p99 <= 1.2)}] p99 ≤ 1.2 ms at the paced rate: "
                 f"{_cell(p99, '{:.2f}')} ms")
    rss = max((r["rss_idle"] for r in kre), default=None)
    lines.append(f"[{_check(None if rss is None else rss <= 80)}] RSS idle ≤ 80 MB: {_cell(rss, '{:.1f}')} MB "
                 f"(worst round; flatness over 1M messages: --soak)")
    for n in io_inflight:
        rounds = extras.get(f"io{n}", [])
        ratio = median_ratio(rounds, _io_ideal(rounds, n), "drain")
        ceiling = _median(rounds, "asyncio")
        lines.append(f"[{_check(None if ratio is None else ratio >= 0.9)}] async 10 ms I/O, N={n}: "
                     f"≥ 0.9 × min(CPU limit, N/10 ms): {_cell(ratio, '{:.2f}')} (asyncio alone: "
                     f"{_cell(None if ceiling is None else ceiling / (n / 0.01), '{:.2f}')})")
    ratio = median_ratio(extras.get("measured", []), kre, "drain")
    lines.append(f"[{_check(None if ratio is None else ratio >= 0.9)}] ctx.measurement per message costs ≤ 10 %: "
                 f"{_cell(None if ratio is None else 1 - ratio, '{:.1%}')}")
    return "\n".join(lines)
