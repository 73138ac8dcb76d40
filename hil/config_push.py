"""A bad config pushed from the platform, for the `bad-config-push` scenario (a
`config_push` fault): the rig runs `citygw platform push-config` as an operator would,
with the gateway's own config but its uplink pointed at a dead broker (a loopback port
nobody listens on) and a short deadline. The gateway must try it, find its uplink not
healthy, and return to the old config by itself within the deadline: the push command
exits "rolled back", the config file is the old one again (`.previous` kept, no `.trial`
left), the platform sees the old config's hash in up/meta again, its history records the
push as rolled back, and the rig's usual invariants show nothing lost meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config_push import previous_path, trial_path
from cli.platform_config import EXIT_ROLLED_BACK
from common.broker import free_port

if TYPE_CHECKING:
    from hil.runner import Rig, Verdict
    from hil.scenario import Fault

#: how long past the deadline the rollback's answer may take (reload, reconnect, publish)
ANSWER_SLACK_S = 20.0
VERSION = "bad-dead-broker"


class BadConfigPush:
    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.original = b""
        self.deadline_s = 0.0
        self.exit_code: int | None = None
        self.output = ""
        self.answer_s: float | None = None  # push sent -> the CLI had the answer
        self.pushed_ms = 0  # wall clock, for the store's times

    def bad_config(self) -> Path:
        """The gateway's config with its uplink pointed at a dead broker."""
        rig = self.rig
        text = rig.config.read_text()
        dead = f"mqtt://127.0.0.1:{free_port()}"  # closed at once: connections refused
        bad = text.replace(f'"{rig.agent_broker_url}"', f'"{dead}"', 1)
        bad = bad.replace("[gateway]\n", f'[gateway]\nconfig_version = "{VERSION}"\n', 1)
        assert bad != text and dead in bad
        path = rig.work / "bad-gateway.toml"
        path.write_text(bad)
        return path

    async def push(self, f: Fault) -> None:
        rig = self.rig
        self.original = rig.config.read_bytes()
        self.deadline_s = f.deadline
        argv = [
            sys.executable, "-m", "cli", "platform", "push-config", str(self.bad_config()),
            "--gateway", rig.gateway, "--broker", rig.broker_url,
            "--deadline", str(int(f.deadline)), "--wait", str(int(f.deadline + ANSWER_SLACK_S)),
            "--db", f"sqlite:///{rig.work / 'platform.db'}", "--by", "hil-rig",
        ]  # fmt: skip
        rig.mark(f"config pushed: uplink at a dead broker, deadline {f.deadline:g} s")
        t, self.pushed_ms = time.monotonic(), time.time_ns() // 1_000_000
        done = await asyncio.to_thread(
            subprocess.run,
            argv,
            capture_output=True,
            text=True,
            timeout=f.deadline + ANSWER_SLACK_S + 60,
            env={**os.environ, "COLUMNS": "200"},
        )
        self.answer_s = time.monotonic() - t
        self.exit_code, self.output = done.returncode, (done.stdout + done.stderr).strip()
        rig.mark(f"config push answered after {self.answer_s:.1f} s: exit {done.returncode}")

    def judge(self, v: Verdict) -> None:
        rig = self.rig
        v.check(self.exit_code is not None, "the config push never ran")
        if self.exit_code is None:
            return
        v.rolled_back = int(self.exit_code == EXIT_ROLLED_BACK)
        v.figures["config_push_answer_s"] = round(self.answer_s or 0.0, 1)
        v.check(
            self.exit_code == EXIT_ROLLED_BACK and "rolled back" in self.output,
            f"the bad config was not rolled back: exit {self.exit_code}: {self.output[-400:]}",
        )
        v.check(
            (self.answer_s or 0.0) <= self.deadline_s + ANSWER_SLACK_S,
            f"the rollback's answer came {self.answer_s:.1f} s after the push "
            f"(deadline {self.deadline_s:g} s)",
        )
        config = rig.config
        v.check(config.read_bytes() == self.original, "the config file is not the old one again")
        v.check(not trial_path(config).exists(), "the trial marker was left behind")
        previous = previous_path(config)
        v.check(
            previous.exists() and previous.read_bytes() == self.original,
            "the config the push replaced is not kept as .previous",
        )
        pushes = rig.store.config_pushes(rig.gateway)
        v.check(
            [p.outcome for p in pushes] == ["rolled_back"],
            f"the platform's history has {[p.outcome for p in pushes]}",
        )
        # the agent's up/meta names the old config again after the push (the bad one's
        # never reached the platform: its broker was dead)
        old_hash = "sha256:" + hashlib.sha256(self.original).hexdigest()
        seen = {c.hash: c for c in rig.store.configs_seen(rig.gateway)}
        v.check(
            old_hash in seen and seen[old_hash].last_seen_ms > self.pushed_ms,
            "the platform did not see the old config in up/meta again after the rollback",
        )
