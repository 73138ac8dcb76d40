"""Config models of the ``sim`` driver: per-device and per-point waveform settings."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from common.units import Duration


class SimDeviceSettings(BaseModel):
    """Keys a ``driver = "sim"`` device accepts besides the common ones."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, description="seed of the device's random generators (reproducible runs)")
    fail_probability: float = Field(
        0.0, ge=0.0, le=1.0, description="probability that a poll fails (simulated dead device)"
    )
    latency: Duration = Field(0.0, le=60.0, description="simulated response time of a poll")
    replay: int = Field(
        0,
        ge=0,
        le=10_000,
        description="sample this many polls once at the start, then replay them in a loop "
        "with fresh timestamps: a load that costs next to nothing a poll (benchmarks); its "
        "points take no writes; 0: sample every poll",
    )


class SimPointSettings(BaseModel):
    """Waveform of one simulated point: base + sine + drift + noise + steps + spikes,
    quantised to ``resolution``."""

    model_config = ConfigDict(extra="forbid")

    base: float = 0.0
    amplitude: float = Field(0.0, ge=0.0, description="amplitude of the sine component")
    period: Duration = Field(3600.0, gt=0.0, description="period of the sine component")
    drift: float = Field(0.0, description="linear drift per hour")
    noise: float = Field(0.0, ge=0.0, description="standard deviation of gaussian noise")
    step_probability: float = Field(
        0.0, ge=0.0, le=1.0, description="chance of a level step per reading"
    )
    step_size: float = 0.0
    spike_probability: float = Field(
        0.0, ge=0.0, le=1.0, description="chance of a one-off spike per reading"
    )
    spike_size: float = 0.0
    resolution: float | None = Field(None, gt=0.0, description="quantisation step, e.g. 0.1")
