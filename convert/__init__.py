"""Checkpoint converters (Hugging Face and RLHF outputs to GGUF and GPTQ); the runtime never imports this."""
