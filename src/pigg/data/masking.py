"""Which tokens the loss sees: exactly the assistant turns, with the end of each turn.

A span opens after the turn header `<|im_start|>assistant\\n` (as token ids, so the word
"assistant" inside user text never opens one) and closes at the first `<|im_end|>`, which is
supervised too (a model that never sees `<|im_end|>` as a target never learns to stop), together
with the `\\n` the chat template writes after it. Qwen's own fine-tuning code and LLaMA-Factory
supervise that `\\n` as well, so loss values compare one to one with theirs; generation stops at
`<|im_end|>` and never sees it. A turn the template ends without a `\\n` (the last one, in some
templates) ends its span at `<|im_end|>`.
"""
import torch

IGNORE_INDEX = -100


def turn_tokens(tokenizer) -> tuple[list[int], int, int]:
    """The assistant header ids, the end-of-turn id and the id of the newline after it, read from the
    tokenizer, never hard-coded."""
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    closing = tokenizer.encode("<|im_end|>\n", add_special_tokens=False)
    if len(header) < 2 or header[0] != tokenizer.convert_tokens_to_ids("<|im_start|>") or end is None \
            or len(closing) != 2 or closing[0] != end:
        raise ValueError(f"tokenizer does not have Qwen's chat tokens (header ids {header}, end id {end}, "
                         f"end of turn and newline {closing})")
    return header, end, closing[1]


def assistant_labels(input_ids: torch.Tensor, header: list[int], end: int, newline: int | None = None) -> torch.Tensor:
    """Labels for a (batch, length) id tensor: ids inside assistant spans, IGNORE_INDEX elsewhere. A span
    runs from after the header to the first `end`, and to the `newline` right after it if there is one."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    n, length = len(header), input_ids.shape[1]
    if length < n:
        return labels
    windows = input_ids.unfold(1, n, 1)  # (batch, length - n + 1, n)
    starts = (windows == torch.tensor(header, dtype=input_ids.dtype)).all(-1)
    for row, pos in starts.nonzero().tolist():
        first = pos + n
        ends = (input_ids[row, first:] == end).nonzero()
        last = first + int(ends[0]) if len(ends) else length - 1
        if newline is not None and len(ends) and last + 1 < length and input_ids[row, last + 1] == newline:
            last += 1
        labels[row, first:last + 1] = input_ids[row, first:last + 1]
    return labels
