"""LoRA and DoRA through Hugging Face PEFT (DoRA is LoRA with `use_dora`, as in PEFT's tuners/lora)."""
