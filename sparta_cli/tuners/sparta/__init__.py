"""SpaRTA: train a fixed random subset of a weight matrix's entries as fp32 deltas."""

from sparta_cli.tuners.sparta.layer import SpartaLinear
from sparta_cli.tuners.sparta.mask import mask_seed, num_selected, select_indices
from sparta_cli.tuners.sparta.model import SpartaModel

__all__ = ["SpartaLinear", "SpartaModel", "mask_seed", "num_selected", "select_indices"]
