"""LoRA / QLoRA fine-tuning that feeds convert/ and the model store."""
