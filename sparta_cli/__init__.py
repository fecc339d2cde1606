"""sparta: fine-tune language models with SpaRTA (Sparse Random parameTer Adaptation)."""

__version__ = "0.1.0"

# Version of the files sparta writes (adapter_config.json, checkpoints).  A reader
# refuses files with a newer format than it knows.
FORMAT_VERSION = 1
