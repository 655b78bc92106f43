"""The command line's sampling options as flow settings: --interval and --cfg-schedule strings parsed,
and a DiT's flow section with the overrides applied; bad values are one-line UserErrors."""

from __future__ import annotations

import dataclasses

from flatdino_cli.errors import UserError
from flatdino_cli.flow import FlowConfig


def sampling_flow(flow: FlowConfig, cfg_scale: float | None = None, steps: int | None = None,
                  sampler: str | None = None, interval: tuple[float, float] | None = None,
                  grid: str | None = None, schedule: tuple[tuple[float, float, float], ...] | None = None,
                  shift: float | None = None, paper: bool = False) -> FlowConfig:
    """The DiT config's flow section with the command line's overrides (validated: bad values are
    one-line errors). A scale or interval given on the command line replaces the config's cfg_schedule;
    a schedule given there replaces both; sampler sde samples on our grid unless a grid is given.
    paper (--paper-sampler): the sampler and steps of the family's paper (flow.paper_sampler,
    flow.paper_steps) instead of flow.sampler / flow.steps, the measured default."""
    if paper:
        if sampler is not None or steps is not None:
            raise UserError("--paper-sampler sets the sampler and its steps (the paper's, flow.paper_sampler and "
                            "flow.paper_steps); pass it without --sampler and --steps")
        sampler, steps = flow.paper_sampler, flow.paper_steps
    changes = {k: v for k, v in (("cfg_scale", cfg_scale), ("steps", steps), ("sampler", sampler),
                                 ("cfg_interval", interval), ("grid", grid), ("cfg_schedule", schedule),
                                 ("shift", shift))
               if v is not None}
    if schedule is None and (cfg_scale is not None or interval is not None):
        changes["cfg_schedule"] = ()
    if sampler == "sde" and grid is None:  # RAE's grid is an ODE grid (RAE checkpoints default to it)
        changes["grid"] = "ours"
    return dataclasses.replace(flow, **changes)


def parse_interval(text: str | None) -> tuple[float, float] | None:
    """'0.225,1' -> (0.225, 1.0); the guidance interval in our time (t = 1 is data)."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--interval {text}: expected LO,HI, e.g. --interval 0.225,1") from None
    return lo, hi


def parse_schedule(text: str | None) -> tuple[tuple[float, float, float], ...] | None:
    """'0-0.1:0.9,0.1-0.3:1.5,0.3-1:2.5' -> ((0, 0.1, 0.9), ...): weight w on lo <= t < hi (our time)."""
    if text is None:
        return None
    try:
        pieces = []
        for part in text.split(","):
            span, w = part.split(":")
            lo, hi = span.split("-")
            pieces.append((float(lo), float(hi), float(w)))
    except ValueError:
        raise UserError(f"--cfg-schedule {text}: expected LO-HI:W,..., e.g. --cfg-schedule 0-0.1:0.9,0.1-0.3:1.5,"
                        "0.3-1:2.5") from None
    return tuple(pieces)
