"""Meta LLaMA checkpoint -> GGUF conversion: reading, merging, tokenizer, quantization, writing."""
