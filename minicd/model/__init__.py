"""The Qwen2/Qwen3/Llama decoder (decoder.py) and its HF config parsing (hf_config.py),
checkpoint I/O (hub.py), GGUF import (gguf.py), tokenizer and chat templates (tokenizer.py) and
LoRA adapters (lora.py). qwen.py keeps the old names (QwenConfig, QwenForCausalLM) as aliases."""
