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


# Seeds are ints in [0, 2**32) (numpy's range) everywhere: the library (devices.check_seed), the flags and the server.
SEED_LIMIT = 2**32


def seed_error(seed: object) -> str | None:
    """Why ``seed`` is not a valid seed, or None when it is."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        return f"must be an int in [0, 2**32), got {seed!r}"
    return None


def bound_error(value: float, low: float | None = None, high: float | None = None, low_open: bool = False,
                shown: str | None = None) -> str | None:
    """Why ``value`` is outside [low, high] (``(low, high]`` with ``low_open``), or None when it is inside."""
    shown = str(value) if shown is None else shown
    if low is not None and (value < low or (low_open and value == low)):
        return f"must be {'>' if low_open else '>='} {low}, got {shown}"
    if high is not None and value > high:
        return f"must be <= {high}, got {shown}"
    return None
