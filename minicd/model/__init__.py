"""Qwen2/Qwen3 decoder (qwen.py), checkpoint I/O (hub.py), tokenizer and chat templates
(tokenizer.py) and LoRA adapters (lora.py)."""
