"""The allowed values of the generation settings and of seeds: one table that `SamplingParams` checks, and that the
command-line flags, the speech server's requests and its OpenAPI schema read, so all of them accept the same values."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Bound:
    """The values one generation setting accepts: an int, or a finite float, within [low, high].

    ``low_open`` makes the range (low, high]; ``sampling_only`` checks the range only when ``do_sample`` is True
    (a temperature is unused by greedy decoding, so upstream's greedy calls may pass any finite number); ``note``
    says what a special value means.
    """

    kind: type
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    sampling_only: bool = False
    note: str = ""

    def range_text(self) -> str:
        """The range in words: "> 0", ">= 1", "within (0, 1]", or "" when any value of the kind is allowed."""
        if self.low is not None and self.high is not None:
            return f"within {'(' if self.low_open else '['}{self.low}, {self.high}]"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"<= {self.high}" if self.high is not None else ""

    def kind_problem(self, value: Any) -> Optional[str]:
        """Why ``value`` is not of this setting's kind (an int; a finite number for floats), or None."""
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            return "must be an integer" if self.kind is int else "must be a finite number"
        if self.kind is float and not math.isfinite(value):
            return "must be a finite number"
        return None

    def range_problem(self, value: float, do_sample: bool = True) -> Optional[str]:
        """Why ``value`` (of the right kind) is outside the range, or None; "must be > 0 when do_sample=True"."""
        if self.sampling_only and not do_sample:
            return None
        below = self.low is not None and (value < self.low or (self.low_open and value == self.low))
        if below or (self.high is not None and value > self.high):
            return f"must be {self.range_text()}" + (" when do_sample=True" if self.sampling_only else "")
        return None

    def problem(self, value: Any, do_sample: bool = True) -> Optional[str]:
        """``kind_problem`` or else ``range_problem``."""
        return self.kind_problem(value) or self.range_problem(value, do_sample)


# Every range rule of a generation call (docs/model.md, Generation); SamplingParams adds only the rules that join two
# settings (min_new_frames <= max_new_frames) and nq, whose range is the model's.
SAMPLING_BOUNDS: dict[str, Bound] = {
    "max_new_frames": Bound(int, 1),
    "text_temperature": Bound(float, 0, low_open=True, sampling_only=True),
    "text_top_p": Bound(float, 0, 1, low_open=True, note="1 disables top-p"),
    "text_top_k": Bound(int, note="<= 0 disables top-k"),
    "audio_temperature": Bound(float, 0, low_open=True, sampling_only=True),
    "audio_top_p": Bound(float, 0, 1, low_open=True, note="1 disables top-p"),
    "audio_top_k": Bound(int, note="<= 0 disables top-k"),
    "audio_repetition_penalty": Bound(float, 0, low_open=True, note="1.0 disables it"),
}


def sampling_problem(name: str, value: Any, do_sample: bool = True) -> Optional[str]:
    """The message for a bad value of generation setting ``name`` ("audio_top_p=0.0 must be within (0, 1] (1
    disables top-p)"), or None when ``SamplingParams`` accepts it."""
    bound = SAMPLING_BOUNDS[name]
    problem = bound.problem(value, do_sample)
    if problem is None:
        return None
    return f"{name}={value!r} {problem}" + (f" ({bound.note})" if bound.note else "")


# Seeds are ints in [0, 2**32) (numpy's range) everywhere: the library (devices.check_seed), the flags and the server.
SEED_LIMIT = 2**32


def seed_error(seed: object) -> str | None:
    """Why ``seed`` is not a valid seed, or None when it is."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        return f"must be an int in [0, 2**32), got {seed!r}"
    return None


def bound_error(value: float, low: float | None = None, high: float | None = None, low_open: bool = False,
                shown: str | None = None) -> str | None:
    """Why ``value`` is outside [low, high] (``(low, high]`` with ``low_open``), or None when it is inside: the side
    it is on ("must be <= 65535, got 70000"), for flags other than the generation settings."""
    shown = str(value) if shown is None else shown
    if low is not None and (value < low or (low_open and value == low)):
        return f"must be {'>' if low_open else '>='} {low}, got {shown}"
    if high is not None and value > high:
        return f"must be <= {high}, got {shown}"
    return None
