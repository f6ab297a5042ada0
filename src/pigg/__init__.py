"""pigg: fine-tune Qwen3-VL into a GUI grounding agent (global, evaluated, personalized, exported)."""
