"""Full fine-tuning: every parameter trains."""

from sparta_cli.tuners.full.tuner import FullTuner

__all__ = ["FullTuner"]
