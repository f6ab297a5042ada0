"""From samples to model inputs: chat template, processor, assistant-only labels.

Runs inside DataLoader workers, so image decoding and tokenisation stay off the training process.
Nothing is truncated: a sample longer than `max_length` is an error that names it, because cutting
inside an image breaks the image-token count the model checks.
"""

from pigg.data import Sample, images_of, open_image
from pigg.masking import IGNORE_INDEX, assistant_labels, turn_tokens


def render(processor, messages: list, add_generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def image_token_count(processor, width: int, height: int) -> int:
    """Image tokens the processor will emit for an image of this size (resize rules included)."""
    ip = processor.image_processor
    patches = ip.get_number_of_image_patches(height, width, {"size": dict(ip.size)})
    return patches // ip.merge_size**2


def sample_length(processor, sample: Sample, sizes: dict) -> tuple[int, int]:
    """(total tokens, image tokens) of a training sample, without decoding its images."""
    text_ids = processor.tokenizer(render(processor, sample.messages), add_special_tokens=False)["input_ids"]
    image_tokens = sum(image_token_count(processor, *sizes[ref]) for ref in images_of(sample))
    # each image is one <|image_pad|> in the rendered text and becomes `image_tokens` of them
    return len(text_ids) - len(images_of(sample)) + image_tokens, image_tokens


class TrainCollator:
    """Turn a list of Samples into a padded batch with labels; checks every sample it sees."""

    def __init__(self, processor, max_length: int):
        self.processor = processor
        self.max_length = max_length
        self.header, self.end = turn_tokens(processor.tokenizer)

    def __call__(self, samples: list[Sample]) -> dict:
        texts = [render(self.processor, s.messages) for s in samples]
        images = [open_image(ref) for s in samples for ref in images_of(s)]
        batch = self.processor(text=texts, images=images, padding=True, padding_side="right", return_tensors="pt")
        lengths = batch["attention_mask"].sum(1).tolist()
        for s, n in zip(samples, lengths):
            if n > self.max_length:
                raise ValueError(f"{s.where}: {n} tokens (image tokens included) exceed data.max_length="
                                 f"{self.max_length}; raise the limit or lower model.max_pixels (never truncated)")
        labels = assistant_labels(batch["input_ids"], self.header, self.end)
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        for s, n in zip(samples, (labels != IGNORE_INDEX).sum(1).tolist()):
            if n == 0:
                raise ValueError(f"{s.where}: no supervised token (no assistant turn after the chat template)")
        batch["labels"] = labels
        return dict(batch)
