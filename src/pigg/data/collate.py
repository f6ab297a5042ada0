"""From samples to model inputs: chat template, processor, assistant-only labels.

Runs inside DataLoader workers, so image decoding and tokenisation stay off the training process.
Nothing is truncated: a sample longer than `max_length` is an error that names it, because cutting
inside an image breaks the image-token count the model checks.
"""
import itertools

import torch

from pigg.data.samples import Sample, images_of, open_image
from pigg.data.masking import IGNORE_INDEX, assistant_labels, turn_tokens


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


def rope_positions(token_types: torch.Tensor, image_grids: torch.Tensor, merge: int) -> torch.Tensor:
    """Qwen3-VL's rotary positions (3, batch, length) of a batch of image-and-text rows, as the model's
    `get_rope_index` computes them on the GPU, here on the CPU of a DataLoader worker. Text advances
    the three positions by one a token; an image's tokens take (start, start + row, start + column) on
    its merged grid, and the text after it starts at start + max(rows, columns). Padding (type 0)
    continues as text: what the model computes when given no attention mask."""
    positions = torch.empty((3, *token_types.shape), dtype=torch.long)
    grids = iter(image_grids.tolist())
    for row, types in enumerate(token_types.tolist()):
        start, end = 0, 0
        for kind, run in itertools.groupby(types):
            begin, end = end, end + len(list(run))
            if kind == 0:
                positions[:, row, begin:end] = torch.arange(start, start + end - begin)
                start += end - begin
                continue
            t, h, w = next(grids, (0, 0, 0))
            h, w = h // merge, w // merge
            if kind != 1 or t * h * w != end - begin:
                raise ValueError(f"row {row}: a run of {end - begin} tokens of type {kind} at {begin} is not the "
                                 f"next image's {t * h * w} tokens (only images are supported)")
            grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
            positions[:, row, begin:end] = grid.reshape(3, -1) + start
            start += max(h, w)
    return positions


def supervised_index(labels: torch.Tensor) -> torch.Tensor:
    """Where the logits of supervised tokens are computed: row x length + position of every position
    whose next token is supervised, in the batch's rows and positions flattened."""
    rows, positions = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * labels.shape[1] + positions


class TrainCollator:
    """Turn a list of Samples into a padded batch with labels; checks every sample it sees.

    With `padding_mask` off the batch carries no attention mask but the rotary positions the model
    would compute from one: rows are padded on the right, so causal attention alone gives every real
    token the same result (its padding comes after it), and the labels ignore the padded positions.
    Rows are padded to a multiple of `pad_to_multiple` tokens; `pixel_dtype` casts the pixels here,
    as the model would first thing (half the bytes to copy to the GPU for bfloat16). With
    `supervised_index` the batch also carries where the supervised tokens' logits are computed
    (`supervised_index`; `pigg.train.supervised_loss` computes logits there only), found here rather
    than on the GPU, where finding them makes the CPU wait for the GPU at the start of every forward.
    With `grid_on_cpu` (and no padding mask: the model then needs the grid for nothing but the vision
    tower, `pigg.fast.vision.batched_vision_attention`), the images' grid also comes as numbers, which the
    DataLoader and accelerate leave on the CPU (`pigg.train.GlobalTrainer`).
    """

    def __init__(self, processor, max_length: int, padding_mask: bool = True, pad_to_multiple: int = 1,
                 pixel_dtype: torch.dtype | None = None, supervised_index: bool = False, grid_on_cpu: bool = False):
        self.processor = processor
        self.supervised_index = supervised_index
        self.grid_on_cpu = grid_on_cpu
        self.max_length = max_length
        self.padding_mask = padding_mask
        self.pad_to_multiple = pad_to_multiple
        self.pixel_dtype = pixel_dtype
        self.header, self.end, self.newline = turn_tokens(processor.tokenizer)

    def __call__(self, samples: list[Sample]) -> dict:
        texts = [render(self.processor, s.messages) for s in samples]
        images = [open_image(ref) for s in samples for ref in images_of(s)]
        batch = self.processor(text=texts, images=images, padding=True, padding_side="right",
                               pad_to_multiple_of=self.pad_to_multiple, return_tensors="pt")
        lengths = batch["attention_mask"].sum(1).tolist()
        for s, n in zip(samples, lengths):
            if n > self.max_length:
                raise ValueError(f"{s.where}: {n} tokens (image tokens included) exceed data.max_length="
                                 f"{self.max_length}; raise the limit or lower model.max_pixels (never truncated)")
        labels = assistant_labels(batch["input_ids"], self.header, self.end, self.newline)
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        for s, n in zip(samples, (labels != IGNORE_INDEX).sum(1).tolist()):
            if n == 0:
                raise ValueError(f"{s.where}: no supervised token (no assistant turn after the chat template)")
        batch["labels"] = labels
        if self.supervised_index:
            batch["supervised_index"] = supervised_index(labels)
        if self.pixel_dtype is not None and "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.pixel_dtype)
        if self.grid_on_cpu and not self.padding_mask and "image_grid_thw" in batch:
            batch["image_grid_rows"] = batch["image_grid_thw"].tolist()  # numbers stay on the CPU
        if not self.padding_mask:
            merge = self.processor.image_processor.merge_size
            batch["position_ids"] = rope_positions(
                batch["mm_token_type_ids"], batch.get("image_grid_thw", torch.zeros(0, 3, dtype=torch.long)), merge)
            del batch["attention_mask"]
        return dict(batch)
