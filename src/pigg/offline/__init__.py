"""The offline stack: synthetic users, the tiny random Qwen3-VL, the Qwen tokenizer builder, the demo."""
