"""The terminal view of a report: rich tables."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from loadtest.report import Report
from loadtest.stats import Summary


def ms(value: float | None) -> str:
    """Seconds as milliseconds, or a dash."""
    return "-" if value is None else f"{value * 1000:.1f}"


def summary_row(table: Table, name: str, s: Summary) -> None:
    """One latency-like row."""
    table.add_row(name, str(s.count), ms(s.mean), ms(s.p50), ms(s.p90), ms(s.p99), ms(s.max))


def render(report: Report, console: Console, max_tasks: int = 10) -> None:
    """Print the run's figures: totals, latencies, per-task, server."""
    c = report.client
    head = Table(title=f"promptserve loadtest: {report.target}", show_header=False)
    head.add_row("workload", describe(report))
    head.add_row("requests", f"{c.num_requests} ({c.num_ok} ok, {c.num_rate_limited} rate limited, "
                             f"{c.num_failed} failed) in {c.wall_s:.1f} s")
    head.add_row("by status", ", ".join(f"{k}: {v}" for k, v in c.by_status.items()) or "-")
    head.add_row("throughput", f"{c.requests_per_s:.2f} req/s, {c.tokens_per_s:.1f} generated tokens/s")
    if report.client_cpu_s is not None and c.wall_s > 0:
        head.add_row("client CPU", f"{report.client_cpu_s:.1f} s ({report.client_cpu_s / c.wall_s:.2f} cores busy)")
    if report.server_cpu is not None:
        cpu = report.server_cpu
        head.add_row("server CPU", f"{cpu.cpu_s:.1f} s (pid {cpu.pid}, {cpu.cores_busy:.2f} cores busy), "
                                   f"{cpu.tokens_per_cpu_s:.1f} generated tokens per CPU second")
    counts = report.counts
    if counts.is_match is not None:
        head.add_row("server count", f"{counts.server_total:g} vs client {counts.client_total}: "
                                     + ("match" if counts.is_match else "MISMATCH"))
    for text, n in c.errors.items():
        head.add_row(f"error x{n}", escape(text))
    console.print(head)
    lat = Table(title="latency (ms)")
    for col in ("", "n", "mean", "p50", "p90", "p99", "max"):
        lat.add_column(col, justify="right")
    summary_row(lat, "request", c.latency)
    summary_row(lat, "first token", c.first_token)
    summary_row(lat, "inter-token", c.inter_token)
    console.print(lat)
    render_tasks(report, console, max_tasks)
    render_tenants(report, console)
    render_server(report, console)


def describe(report: Report) -> str:
    """One line about the workload."""
    w = report.workload
    if w["mode"] == "closed":
        load = f"closed loop, concurrency {w['concurrency']}"
    else:
        load = f"open loop, {w['rate']:g} req/s"
    bounds = [f"{w['duration_s']:g} s" if w["duration_s"] else "",
              f"{w['num_requests']} requests" if w["num_requests"] else ""]
    popularity = ""
    if report.num_tasks > 1:
        popularity = f" ({w['popularity']}" + (f" s={w['zipf_s']:g})" if w["popularity"] == "zipf" else ")")
    stream = "streaming" if w["is_stream"] else "not streaming"
    return (f"{load}, {' and '.join(b for b in bounds if b)}, {report.num_tasks} task(s){popularity}, "
            f"prompt {w['prompt_tokens']} words, max_new_tokens {w['max_new_tokens']}, {stream}"
            f"{describe_tenants(w)}")


def describe_tenants(w: dict) -> str:
    """`, 3 tenants (noisy: bob x10; rate per steady tenant)`, or nothing without tenants."""
    if not w.get("tenants"):
        return ""
    if not w.get("noisy_tenant"):
        return f", {len(w['tenants'])} tenants (by popularity)"
    per = "concurrency" if w["mode"] == "closed" else "rate"
    return (f", {len(w['tenants'])} tenants (noisy: {w['noisy_tenant']} x{w['noisy_factor']:g}; "
            f"{per} per steady tenant)")


def render_tasks(report: Report, console: Console, max_tasks: int) -> None:
    """The busiest tasks."""
    if len(report.client.per_task) <= 1:
        return
    table = Table(title=f"per task (busiest {min(max_tasks, len(report.client.per_task))} "
                        f"of {len(report.client.per_task)})")
    for col in ("task", "requests", "ok", "tokens", "p50 ms", "p99 ms"):
        table.add_column(col, justify="right")
    for t in report.client.per_task[:max_tasks]:
        table.add_row(escape(t.task_id), str(t.num_requests), str(t.num_ok), str(t.generated_tokens),
                      ms(t.latency.p50), ms(t.latency.p99))
    console.print(table)


def render_server(report: Report, console: Console) -> None:
    """What the server's /metrics said."""
    s = report.server
    if not s.is_available:
        console.print("[yellow]server /metrics: not available[/yellow]")
        return
    table = Table(title="server /metrics (delta over the run)", show_header=False)
    for key, values in s.counters.items():
        table.add_row(escape(f"{key} [{s.families[key]}]"), counter_text(values))
    for key in s.gauge_series:
        peak, mean = s.gauge_peak(key), s.gauge_mean(key)
        if peak is not None:
            table.add_row(escape(f"{key} [{s.families[key]}]"), f"peak {peak:g}, mean {mean:.2f} (sampled during the run)")
    if s.missing:
        table.add_row("not found", ", ".join(s.missing))
    console.print(table)


def counter_text(values: dict[str, float]) -> str:
    """`200: 40, 429: 2`, or just the number for an unlabelled counter."""
    if set(values) == {"all"}:
        return f"{values['all']:g}"
    return ", ".join(f"{k}: {v:g}" for k, v in sorted(values.items())) or "0"


def render_tenants(report: Report, console: Console) -> None:
    """Per-tenant counts (429s apart from errors), then latencies; in the tenants file's order."""
    if not report.tenants:
        return
    has_noisy = any(t.is_noisy for t in report.tenants.values())
    counts = Table(title="per tenant (429: rate limited, not an error)",
                   caption="* the noisy tenant" if has_noisy else None)
    for col in ("tenant", "share", "requests", "ok", "429", "failed", "tokens", "ok req/s"):
        counts.add_column(col, justify="right")
    for name, t in report.tenants.items():
        counts.add_row(tenant_label(name, t.is_noisy), f"{t.share:.0%}", str(t.num_requests), str(t.num_ok),
                       str(t.num_rate_limited), str(t.num_failed), str(t.generated_tokens),
                       f"{t.requests_per_s:.2f}")
    console.print(counts)
    is_stream = report.workload["is_stream"]
    latency = Table(title="per tenant latency (ms, ok requests)")
    for col in ("tenant", "p50", "p90", "p99") + (("ttft p50", "ttft p90", "ttft p99") if is_stream else ()):
        latency.add_column(col, justify="right")
    for name, t in report.tenants.items():
        row = [tenant_label(name, t.is_noisy), ms(t.latency.p50), ms(t.latency.p90), ms(t.latency.p99)]
        if is_stream:
            row += [ms(t.first_token.p50), ms(t.first_token.p90), ms(t.first_token.p99)]
        latency.add_row(*row)
    console.print(latency)


def tenant_label(name: str, is_noisy: bool) -> str:
    """The tenant's name, starred when it is the noisy one."""
    return escape(name) + (" *" if is_noisy else "")
