"""What `citygw status` and `citygw buffer inspect` show, read from the buffer
database without disturbing the running agent (read-only open): queue depth per
lane, oldest unsent reading, evictions, the last PUBACK, the uplink state and the
health of every device, as the agent last recorded them."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from agent.runtime import STATUS_INTERVAL_S
from buffer import Buffer, BufferStats, Lane
from common import wire
from common.cli import age
from native import codec


def collect(buffer_path: Path) -> tuple[BufferStats, dict[str, Any]]:
    with Buffer.open_readonly(buffer_path) as buf:
        return buf.stats(), buf.get_state()


def agent_running(state: dict[str, Any], now_ms: int) -> bool:
    """Whether the agent that recorded `state` runs: its status snapshot is recent, and
    not the last one of a graceful stop (that says "stopped", however recent)."""
    agent = state.get("agent") or {}
    updated = agent.get("updated_ms")
    return (
        agent.get("state") != "stopped"
        and updated is not None
        and now_ms - updated < 3 * STATUS_INTERVAL_S * 1000
    )


def _names(label: str, names: list[str]) -> str:
    return f"{label} {', '.join(names)}" if names else ""


def reload_summary(record: dict[str, Any]) -> str:
    """One line for a reload's record (Agent.record_reload): what it changed, or why
    it was refused."""
    if not record.get("ok"):
        first = str(record.get("error") or "").splitlines() or ["(no reason recorded)"]
        more = len(str(record.get("error") or "").splitlines()) - 1
        return f"refused: {first[0]}" + (f" (and {more} more problems)" if more > 0 else "")
    d = record.get("diff") or {}
    parts = [
        _names("added", d.get("added", [])),
        _names("removed", d.get("removed", [])),
        _names("changed", d.get("changed", [])),
        f"{len(d.get('unchanged', []))} devices untouched",
        "uplink reconnected" if d.get("uplink_changed") else "",
        f"stage state kept for {d.get('stages_kept', 0)} points, "
        f"reset for {d.get('stages_reset', 0)}",
        _names("restarted with their driver", d.get("restarted", [])),
    ]
    return f"applied version {record.get('version')}: " + "; ".join(p for p in parts if p)


def render_status(stats: BufferStats, state: dict[str, Any], now_ms: int | None = None) -> Group:
    now_ms = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    agent = state.get("agent") or {}
    updated = agent.get("updated_ms")
    up = agent.get("uplink") or {}
    stopped = agent.get("state") == "stopped"
    running = agent_running(state, now_ms)

    lanes = Table(title="buffer", show_lines=False)
    for col in ("lane", "batches", "readings", "bytes", "oldest unsent"):
        lanes.add_column(col, justify="right" if col != "lane" else "left")
    for lane in Lane:
        ls = stats.lanes[lane]
        lanes.add_row(
            lane.name.lower(),
            str(ls.messages),
            str(ls.points),
            str(ls.bytes),
            age(ls.oldest_created_ms, now_ms),
        )
    lanes.caption = (
        f"{stats.total_bytes} of {stats.capacity_bytes} bytes used · "
        f"evicted: {stats.evicted_points} readings in {stats.evicted_messages} batches · "
        f"last ack: {age(stats.last_ack_ms, now_ms)} · "
        f"synced: {age(stats.last_sync_ms, now_ms)}"
    )
    if stats.intake_points:
        lanes.caption += f" · {stats.intake_points} readings in the intake"
    if stats.unclean_starts:
        lanes.caption += (
            f" · {stats.unclean_starts} unclean stops ({stats.seq_skipped} sequence numbers"
            " skipped)"
        )

    summary = Table(show_header=False, title="agent")
    summary.add_row(
        "agent",
        "running"
        if running
        else f"{'stopped' if stopped else 'not running'} (last seen {age(updated, now_ms)})",
    )
    if updated is not None:  # the ages below are measured now, from what it recorded then
        summary.add_row("status written", f"{age(updated, now_ms)} (every {STATUS_INTERVAL_S:g} s)")
    summary.add_row(
        "uplink",
        str(up.get("state", "unknown"))
        + (f" — last error: {up['last_error']}" if up.get("last_error") else ""),
    )
    summary.add_row("last PUBACK", age(up.get("last_puback_ms"), now_ms))
    if "metrics" in agent:  # a snapshot of an older version has none
        summary.add_row("metrics", Text(_metrics(agent["metrics"])))  # "[...]" is no markup
    if up.get("buffer_errors"):
        summary.add_row(
            "uplink buffer errors",
            f"{up['buffer_errors']} (retried) — last: {up.get('last_buffer_error')}",
        )
    counters = agent.get("counters") or {}
    for key in ("read", "sent", "refused", "flagged", "dropped", "suppressed", "lost"):
        summary.add_row(key, str(counters.get(key, 0)))
    summary.add_row(
        "alarms raised / cleared",
        f"{counters.get('alarms_raised', 0)} / {counters.get('alarms_cleared', 0)}",
    )
    for key, label in (
        ("flush_failures", "failed flushes"),
        ("intake_failures", "failed intake commits"),
        ("status_failures", "failed status/sync steps"),
        ("recovered", "readings recovered from the intake"),
        ("clock_flagged", "readings under a wrong clock"),
        ("clock_steps", "clock steps"),
    ):
        if counters.get(key):
            summary.add_row(label, str(counters[key]))
    if (last := state.get("reload")) is not None:
        summary.add_row(
            "last reload",
            f"{age(last.get('ts_ms'), now_ms)} ({last.get('source')}) {reload_summary(last)}",
        )
    if state.get("buffer_recovered"):
        summary.add_row(
            "buffer recovered", f"corrupt database moved to {state['buffer_recovered']}"
        )

    tasks = Table(title="tasks that failed (restarted with backoff)")
    for col in ("task", "state", "failures", "last failure"):
        tasks.add_column(col, no_wrap=True)
    tasks.add_column("last error", overflow="fold", ratio=1)
    for name, t in sorted((agent.get("tasks") or {}).items()):
        if t.get("failures"):
            tasks.add_row(
                name,
                str(t.get("state", "")),
                str(t["failures"]),
                age(t.get("last_failure_ms"), now_ms),
                t.get("last_error") or "",
            )

    health = sorted((agent.get("devices") or {}).items())
    rows = [
        (
            name + (" (offline)" if h.get("online") is False else ""),
            age(h.get("last_success_ms"), now_ms),
            # an event-driven device (mqtt) is never polled: count the messages it sent
            f"{h['messages']} msgs" if h.get("messages") is not None else str(h.get("polls", 0)),
            str(h.get("errors", 0)),
            str(h.get("consecutive_failures", 0)),
            str(h.get("skipped_polls", 0)),
        )
        for name, h in health
    ]
    devices = Table(title="devices")
    _whole_column(devices, "device", (r[0] for r in rows), name=True)
    _whole_column(devices, "last success", (r[1] for r in rows))
    _whole_column(devices, "polls or msgs", (r[2] for r in rows))
    for col in ("errors", "in a row", "skipped"):
        devices.add_column(col)
    for r in rows:
        devices.add_row(*r)
    # the words in a table of their own: beside six columns they would wrap a word a line
    failed = [
        (name, age(h.get("last_error_ms"), now_ms), _errors(h))
        for name, h in health
        if h.get("last_error") or h.get("rejected")
    ]
    errors = Table(title="device errors")
    _whole_column(errors, "device", (f[0] for f in failed), name=True)
    _whole_column(errors, "when", (f[1] for f in failed))
    errors.add_column("last error", overflow="fold", ratio=1)
    for f in failed:
        errors.add_row(*f)
    rules = render_rules(agent, now_ms)
    return Group(
        summary,
        lanes,
        *([tasks] if tasks.row_count else []),
        devices,
        *([errors] if errors.row_count else []),
        *([rules] if rules is not None else []),
    )


def render_rules(agent: dict[str, Any], now_ms: int) -> Table | None:
    """The local rules: their state, who overrides them, and their last actions."""
    rules = agent.get("rules") or {}
    if not rules:
        return None
    table = Table(title="rules (local action)")
    for col in ("rule", "state", "condition", "starts/h"):
        table.add_column(col, no_wrap=True)
    table.add_column("last actions", overflow="fold", ratio=1)
    for rule_id, r in sorted(rules.items()):
        state = r.get("state", "")
        if r.get("overridden"):
            state += f", overridden by {r['overridden']}"
        if r.get("dry_run"):
            state += ", dry run"
        cond = r.get("condition")
        lines = [
            f"{age(a.get('ts_ms'), now_ms)} {a.get('transition')}: "
            + " ".join(str(a[k]) for k in ("action", "target", "outcome") if a.get(k))
            + (f" ({a['detail']})" if a.get("detail") else "")
            for a in reversed(r.get("last_actions") or [])
        ]
        table.add_row(
            rule_id,
            state,
            "unknown" if cond is None else "holds" if cond else "does not hold",
            str(r.get("starts_last_hour", 0)),
            "\n".join(lines) or "none yet",
        )
    local = agent.get("local") or {}
    if local.get("errors"):  # a bug on the push path: the batches' derived readings lost
        table.caption = (
            f"derived points and rules failed on {local['errors']} batches; last: "
            f"{local.get('last_error', '')} (see the log)"
        )
    return table


def _whole_column(table: Table, title: str, cells: Iterable[str], name: bool = False) -> None:
    """A column whose cells keep to one line (names, ages), its title wrapping between
    words if need be; a `name` column is never cut, its title neither."""
    widest = max((len(c) for c in cells), default=0)
    if name:
        table.add_column(title, no_wrap=True, min_width=max(widest, len(title)))
    else:
        table.add_column(title, min_width=widest)


def _errors(health: dict[str, Any]) -> str:
    """A device's last error, and the malformed inputs it sent by reason (which a retry
    may have made good, so they are not all errors)."""
    rejected = health.get("rejected") or {}
    lines = [health["last_error"]] if health.get("last_error") else []
    if rejected:
        lines.append("rejected: " + ", ".join(f"{k} {n}" for k, n in sorted(rejected.items())))
    return "\n".join(lines)


def render_inspect(buffer_path: Path, limit: int = 20) -> Group:
    with Buffer.open_readonly(buffer_path) as buf:
        stats = buf.stats()
        messages = buf.peek(limit)
        points = buf.registry.all()
        stream = buf.stream_id
    now_ms = time.time_ns() // 1_000_000
    head = Table(show_header=False, title=f"buffer {buffer_path}")
    head.add_row("stream id", stream)
    head.add_row("file size", f"{buffer_path.stat().st_size} bytes")
    head.add_row("registered points", str(len(points)))
    head.add_row("payload bytes held", f"{stats.total_bytes} of {stats.capacity_bytes}")
    head.add_row("evicted", f"{stats.evicted_points} readings in {stats.evicted_messages} batches")
    table = Table(title=f"next {len(messages)} batches to send")
    for col in ("seq", "lane", "readings", "bytes", "created", "time span", "note"):
        table.add_column(col)
    for m in messages:
        span, note = "", ""
        try:
            if m.lane == Lane.ALARM:
                _, events, actions = wire.decode_alarms(m.payload)
                note = ", ".join(
                    [f"{e.rule} {'raised' if e.raised else 'cleared'}" for e in events]
                    + [f"rule {a.rule}: {a.transition} {a.action} {a.outcome}" for a in actions]
                )
            else:
                b = codec.decode(m.payload)
                if len(b):
                    span = f"{(max(b.timestamps) - min(b.timestamps)) / 1000:.1f} s"
        except (codec.CodecError, wire.WireError) as exc:
            note = f"undecodable: {exc}"
        table.add_row(
            str(m.seq),
            m.lane.name.lower(),
            str(m.n_points),
            str(len(m.payload)),
            age(m.created_ms, now_ms),
            span,
            note,
        )
    return Group(head, table)


def render_device_info(state: dict[str, Any]) -> Table | None:
    """The devices' information as the agent last sent it in up/stats (serial numbers,
    firmware versions, BTHome text...), with what was cut or left out; None if there is
    nothing to show."""
    agent = state.get("agent") or {}
    info = agent.get("info") or {}
    counters = agent.get("counters") or {}
    cut, left_out = counters.get("info_truncated", 0), counters.get("info_refused", 0)
    table = Table(title="device information (sent to the platform in up/stats)")
    for col in ("device", "name", "value"):
        table.add_column(col, overflow="fold")
    for device, entries in sorted(info.items()):
        for name, value in sorted(entries.items()):
            table.add_row(device, name, value)
    if cut or left_out:  # wire.bound_devices: counted once per change, logged
        table.caption = f"values cut: {cut} · entries left out: {left_out} (see the log)"
    return table if table.row_count or table.caption else None


def _metrics(metrics: dict[str, Any] | None) -> str:
    """Where the Prometheus endpoint is, or why it is not served."""
    if not metrics:
        return "off ([metrics] enabled = false)"
    if metrics.get("last_error"):
        return (
            f"not served: {metrics['last_error']} ({metrics.get('bind_failures', 0)} failed "
            "tries; tried again every minute)"
        )
    return f"{metrics.get('url')} ({metrics.get('state')})"
