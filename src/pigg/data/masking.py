"""Which tokens the loss sees: exactly the assistant turns, end-of-turn token included.

A span opens after the turn header `<|im_start|>assistant\\n` (as token ids, so the word
"assistant" inside user text never opens one) and closes at the first `<|im_end|>`, which is
supervised too: a model that never sees `<|im_end|>` as a target never learns to stop.
"""
import torch

IGNORE_INDEX = -100


def turn_tokens(tokenizer) -> tuple[list[int], int]:
    """The assistant header ids and the end-of-turn id, read from the tokenizer, never hard-coded."""
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if len(header) < 2 or header[0] != tokenizer.convert_tokens_to_ids("<|im_start|>") or end is None:
        raise ValueError(f"tokenizer does not have Qwen's chat tokens (header ids {header}, end id {end})")
    return header, end


def assistant_labels(input_ids: torch.Tensor, header: list[int], end: int) -> torch.Tensor:
    """Labels for a (batch, length) id tensor: ids inside assistant spans, IGNORE_INDEX elsewhere."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    n = len(header)
    if input_ids.shape[1] < n:
        return labels
    windows = input_ids.unfold(1, n, 1)  # (batch, length - n + 1, n)
    starts = (windows == torch.tensor(header, dtype=input_ids.dtype)).all(-1)
    for row, pos in starts.nonzero().tolist():
        first = pos + n
        ends = (input_ids[row, first:] == end).nonzero()
        last = first + int(ends[0]) if len(ends) else input_ids.shape[1] - 1
        labels[row, first:last + 1] = input_ids[row, first:last + 1]
    return labels
