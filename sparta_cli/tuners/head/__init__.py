"""Head only: the classification head trains, the body stays frozen (a linear probe)."""

from sparta_cli.tuners.head.tuner import HeadTuner

__all__ = ["HeadTuner"]
