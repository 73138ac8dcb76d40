"""`citygw doctor`: the checks a technician would otherwise make by hand at the cabinet,
each a `Check` (pass / warn / fail / skip, with the fix). One module per area (config,
buffer, clock, broker, devices, service); `run.py` runs them all for a config. Nothing
here prints: cli/doctor.py renders the checks."""

from agent.doctor.check import Check, Status, exit_code, result
from agent.doctor.run import Options, run_checks

__all__ = ["Check", "Options", "Status", "exit_code", "result", "run_checks"]
