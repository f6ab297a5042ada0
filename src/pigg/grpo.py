"""TRL's GRPOTrainer with its answers sampled by pigg's generator (`pigg.generation`), which `pigg rl`
uses unless `rl.sampler: transformers`.

TRL samples with transformers' `generate()` on prompts padded on the left: each of the G copies of a
prompt is prefilled again, every layer attends through a padding mask and each decoding step is some 600
kernel launches. pigg's generator prefills each prompt once for its group, without a mask, and decodes
from a static cache with the step captured as a CUDA graph. It draws from the same distribution as
TRL's settings give `generate()` (temperature, top-p, top-k, the image token suppressed, TRL's end
tokens; `pigg.generation.Sampling`) and returns what TRL's own path returns: each answer's ids up to and
including its end token. The cache and the graph are freed after each round of sampling, so the policy
update has the memory back.

The hook is TRL's `_generate_single_turn`, a private method (hence `trl>=1.16,<2` in pyproject.toml;
`tests/test_rl.py` compares both paths' answers). TRL's path is kept where pigg's cannot stand in: vLLM,
continuous batching, tools, ZeRO-3 or FSDP (their weights are gathered for the generation only), and
settings pigg's sampler lacks (min_p, a repetition penalty).
"""
import torch
import trl
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import pad

from pigg.generation import Generator, Sampling


class GRPOTrainer(trl.GRPOTrainer):
    def __init__(self, *args, sampler: str = "pigg", liger: bool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampler, self.liger = sampler, liger  # liger: Liger's kernels in the sampler's prefill
        self.pigg_generator = None

    def pigg_samples(self) -> bool:
        """Whether pigg's generator samples this run's answers (else TRL's own path)."""
        g = getattr(self, "generation_kwargs", None) or {}
        return (self.sampler == "pigg" and not self.use_vllm and not self.use_transformers_continuous_batching
                and not self.tools and not self._dist.is_zero3 and not self._dist.is_fsdp
                and g.get("min_p") is None and g.get("repetition_penalty", 1.0) in (None, 1.0))

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if not self.pigg_samples():
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        batch = prompt_batch(prompt_ids, multimodal_fields, self._tokenizer.pad_token_id)
        with (unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                          gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
              as model):
            if self.pigg_generator is None:
                g = self.generation_kwargs
                sampling = Sampling(temperature=g["temperature"], top_p=g["top_p"] or 1.0, top_k=g["top_k"] or 0,
                                    banned=tuple(g.get("suppress_tokens") or ()))
                self.pigg_generator = Generator(model, self.processing_class, g["max_new_tokens"],
                                                sampling=sampling, stop=self.eos_token_ids, liger=self.liger)
            try:
                completion_ids = self.pigg_generator.answer_ids(batch)
            finally:
                self.pigg_generator.close()
        return completion_ids, None  # logprobs: TRL computes them with the policy's forward, as for generate()


def prompt_batch(prompt_ids: list[list[int]], fields: dict, pad_id: int) -> dict:
    """TRL's tokenized prompts (and the processor's image fields) as one batch padded on the right."""
    def padded(rows, value):
        return pad([torch.tensor(row) for row in rows], padding_value=value, padding_side="right")

    batch = {"input_ids": padded(prompt_ids, pad_id), "attention_mask": padded([[1] * len(r) for r in prompt_ids], 0)}
    for key, value in fields.items():
        if isinstance(value, torch.Tensor):
            batch[key] = value
        elif isinstance(value, list) and value and isinstance(value[0], list):  # per token (mm_token_type_ids)
            batch[key] = padded(value, 0)
        else:
            batch[key] = torch.as_tensor(value)
    return batch
