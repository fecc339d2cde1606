"""Adaptation methods, one folder each (PEFT's layout): config/mask math, layer math, model surgery."""
