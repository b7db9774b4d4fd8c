"""Scale schedules: the (h, w) token map of every scale of a next-scale sequence.

One source of truth for the quantizer, the backbones, RoPE, the transformation network and the
data (crop size = last scale x tokenizer stride). A schedule is written in YAML as

- a name: Infinity's dynamic-resolution sizes ``0.06M`` (7 scales, 256 px at stride 16),
  ``0.25M`` (10, 512 px), ``0.60M`` (12, 768 px), ``1M`` (13, 1024 px); VAR's ``var256`` /
  ``var512``;
- a list of sides (square maps), e.g. ``[1, 2, 4, 8]``;
- a list of ``[h, w]`` pairs.

Infinity's tables exist for the aspect templates h/w in :data:`INFINITY_TEMPLATES`; the template
nearest to an image's h/w is used (:func:`nearest_template`). Every pn of one aspect is a prefix
of that aspect's 13-scale list, so the positions of scale k never depend on the pn.
"""

from __future__ import annotations

from typing import Union

HW = tuple[int, int]
Schedule = tuple[HW, ...]
ScheduleSpec = Union[str, list[int], list[tuple[int, int]], tuple]

# Infinity's 13-scale lists per aspect ratio h/w (the 1M column; smaller pn are prefixes)
_INFINITY_BASE: dict[float, Schedule] = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)),
}
# the inverse aspects (w > h) swap h and w; their keys are 1/ratio truncated to 3 decimals, as Infinity names them
INFINITY_TEMPLATES: dict[float, Schedule] = dict(_INFINITY_BASE)
INFINITY_TEMPLATES |= {int(1 / r * 1000) / 1000: tuple((w, h) for h, w in s) for r, s in _INFINITY_BASE.items() if r != 1.0}

INFINITY_PN: dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}
VAR_SIDES: dict[str, tuple[int, ...]] = {
    "var256": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    "var512": (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
}


def nearest_template(h_div_w: float) -> float:
    """The Infinity aspect template closest to h / w."""
    return min(INFINITY_TEMPLATES, key=lambda t: abs(t - h_div_w))


def infinity_schedule(pn: str, h_div_w: float = 1.0) -> Schedule:
    """Infinity's dynamic-resolution schedule for a pixel budget name and aspect ratio h / w."""
    if pn not in INFINITY_PN:
        raise ValueError(f"unknown Infinity schedule {pn!r}; choose one of {sorted(INFINITY_PN)}")
    return INFINITY_TEMPLATES[nearest_template(h_div_w)][: INFINITY_PN[pn]]


def rope_grid(schedule: Schedule) -> HW:
    """The final map of the 1M schedule of the schedule's aspect: Infinity's 2-D RoPE expresses every
    scale's positions in these coordinates. Schedules that are not Infinity's use their own last map."""
    for full in INFINITY_TEMPLATES.values():
        if tuple(full[: len(schedule)]) == tuple(schedule):
            return full[-1]
    return schedule[-1]


def resolve(spec: ScheduleSpec, h_div_w: float = 1.0) -> Schedule:
    """A schedule from its YAML form (name, list of sides, or list of [h, w])."""
    if isinstance(spec, str):
        if spec in VAR_SIDES:
            return tuple((p, p) for p in VAR_SIDES[spec])
        if spec in INFINITY_PN:
            return infinity_schedule(spec, h_div_w)
        raise ValueError(f"unknown schedule {spec!r}; use one of {sorted(INFINITY_PN) + sorted(VAR_SIDES)}, a list of sides or of [h, w]")
    out = tuple((int(s), int(s)) if isinstance(s, int) else (int(s[0]), int(s[1])) for s in spec)
    if not out or any(h < 1 or w < 1 for h, w in out):
        raise ValueError(f"schedule {spec!r} must list at least one scale of positive sides")
    return out


def tokens(schedule: Schedule) -> int:
    """Number of tokens of a schedule (sum of h * w)."""
    return sum(h * w for h, w in schedule)


def scaled(schedule: Schedule, factor: int) -> Schedule:
    """Every map ``factor`` times larger (Infinity-8B's VAE space is twice the transformer's)."""
    return tuple((h * factor, w * factor) for h, w in schedule)
