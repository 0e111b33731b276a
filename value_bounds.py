"""The ranges of the generation settings, shared by the command-line flags and the speech server's requests."""

from __future__ import annotations

# (type, low, high, low_open) of each generation setting: the flags and the speech server check the same ranges.
SAMPLING_BOUNDS: dict[str, tuple] = {
    "text_temperature": (float, 0, None, True),
    "text_top_p": (float, 0, 1, True),
    "text_top_k": (int, 0),
    "audio_temperature": (float, 0, None, True),
    "audio_top_p": (float, 0, 1, True),
    "audio_top_k": (int, 0),
    "audio_repetition_penalty": (float, 0, None, True),
    "max_new_frames": (int, 1),
}


def bound_error(value: float, low: float | None = None, high: float | None = None, low_open: bool = False,
                shown: str | None = None) -> str | None:
    """Why ``value`` is outside [low, high] (``(low, high]`` with ``low_open``), or None when it is inside."""
    shown = str(value) if shown is None else shown
    if low is not None and (value < low or (low_open and value == low)):
        return f"must be {'>' if low_open else '>='} {low}, got {shown}"
    if high is not None and value > high:
        return f"must be <= {high}, got {shown}"
    return None
