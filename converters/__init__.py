"""Converters: alignment vectors (aligned - base) from HF checkpoints, GGUF files or PEFT LoRAs into
GGUF LoRA adapters that stock llama.cpp applies. Needs the `convert` extra (torch, safetensors)."""
