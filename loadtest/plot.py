"""PNG plots (matplotlib, Agg backend): one run's latency and throughput; a sweep's throughput vs p99."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from loadtest.report import Report


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported only when plotting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latencies(report: Report, key: str) -> list[float]:
    """Per-request values of `key` (seconds) for successful requests."""
    return [row[key] for row in report.requests if row["status"] == "200" and row[key] is not None]


def plot_run(report: Report, path: str | Path, title: str | None = None) -> Path:
    """Latency distribution (request and first token) and throughput over time, one PNG."""
    plt = pyplot()
    has_gauges = any(report.server.gauge_series.values())
    fig, axes = plt.subplots(1, 3 if has_gauges else 2, figsize=(15 if has_gauges else 11, 4.2))
    ax = axes[0]
    for key, label in (("latency_s", "request latency"), ("first_token_s", "time to first token")):
        values = sorted(v * 1000 for v in latencies(report, key))
        if values:  # empirical CDF: percentiles read straight off the y axis
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post",
                    label=f"{label} (n={len(values)})")
    for q in (0.5, 0.99):
        ax.axhline(q, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests (p50, p99 dotted)")
    ax.set_title("latency distribution (CDF)")
    ax.legend(fontsize=8, loc="lower right")
    ax = axes[1]
    series = report.throughput_series
    ax.plot([s[0] for s in series], [s[2] for s in series], color="tab:green", label="generated tokens/s")
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("tokens/s", color="tab:green")
    twin = ax.twinx()
    twin.plot([s[0] for s in series], [s[1] for s in series], color="tab:blue", linestyle="--", label="requests/s")
    twin.set_ylabel("requests/s", color="tab:blue")
    bucket_s = series[1][0] - series[0][0] if len(series) > 1 else 1.0
    ax.set_title(f"throughput over time ({bucket_s:g} s buckets)")
    if has_gauges:
        ax = axes[2]
        for key, points in report.server.gauge_series.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                    label=key.replace("_", " "))
        ax.set_xlabel("seconds into the run")
        ax.set_title("server gauges (/metrics)")
        ax.legend(fontsize=8)
    fig.suptitle(title or f"{report.target}: {report.num_tasks} task(s), {report.client.num_ok} ok requests")
    return save(fig, path)


def plot_sweep(reports: Sequence[Report], path: str | Path, title: str | None = None) -> Path:
    """Throughput against p99 latency, one point per concurrency level; and both against concurrency."""
    plt = pyplot()
    fig, (ax, by_level) = plt.subplots(1, 2, figsize=(12, 4.5))
    levels = [r.workload["concurrency"] for r in reports]
    tokens = [r.client.tokens_per_s for r in reports]
    p50 = [(r.client.latency.p50 or 0) * 1000 for r in reports]
    p99 = [(r.client.latency.p99 or 0) * 1000 for r in reports]
    ax.plot(tokens, p99, marker="o")
    for level, x, y in zip(levels, tokens, p99):
        ax.annotate(f"c={level}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("generated tokens/s")
    ax.set_ylabel("p99 request latency (ms)")
    ax.set_title("throughput vs p99 latency")
    ax.grid(True, alpha=0.3)
    by_level.plot(levels, tokens, marker="o", color="tab:green", label="tokens/s")
    by_level.set_xscale("log", base=2)
    by_level.set_xlabel("concurrency")
    by_level.set_ylabel("generated tokens/s", color="tab:green")
    twin = by_level.twinx()
    twin.plot(levels, p50, marker="s", linestyle="--", label="p50 latency")
    twin.plot(levels, p99, marker="^", linestyle="--", label="p99 latency")
    twin.set_ylabel("request latency (ms)")
    twin.legend(fontsize=8, loc="upper left")
    by_level.set_title("by concurrency")
    target = reports[0].target if reports else ""
    fig.suptitle(title or f"concurrency sweep: {target}")
    return save(fig, path)


def save(fig, path: str | Path) -> Path:
    """Write the figure as PNG and free it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
