"""Head only: the classification head trains, the body stays frozen (a linear probe)."""
