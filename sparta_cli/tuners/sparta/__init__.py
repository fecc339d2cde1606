"""SpaRTA: train a fixed random subset of a weight matrix's entries as fp32 deltas."""
