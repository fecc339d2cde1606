"""LoRA and DoRA through Hugging Face PEFT (DoRA is LoRA with `use_dora`, as in PEFT's tuners/lora)."""

from sparta_cli.tuners.lora.tuner import DoraTuner, LoraTuner

__all__ = ["DoraTuner", "LoraTuner"]
