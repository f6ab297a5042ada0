"""The model-FLOPs utilisation (MFU) every training benchmark reports: the LLM's forward is 2 x 7.57B
FLOPs per token, a LoRA step 2 forwards (forward, input gradients), a full fine-tuning step 3, plus one
3.4 TFLOP vision forward per screenshot; recomputation is not counted. Against 989 TFLOP/s per GPU
(H100 and H200 dense bf16 peak)."""
PEAK_FLOPS = 989e12
LLM_FORWARD_FLOPS_PER_TOKEN = 2 * 7.57e9
VISION_FORWARD_FLOPS = 3.4e12
FORWARDS_PER_STEP = {"lora": 2, "full": 3}


def mfu(method: str, samples_per_s: float, tokens_per_sample: float, gpus: int = 1) -> float:
    """Model-FLOPs utilisation per GPU, as a fraction."""
    per_sample = tokens_per_sample * LLM_FORWARD_FLOPS_PER_TOKEN * FORWARDS_PER_STEP[method] + VISION_FORWARD_FLOPS
    return samples_per_s * per_sample / (gpus * PEAK_FLOPS)
