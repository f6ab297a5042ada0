"""Greedy answers for batches of prompts, fast: what evaluation, personalization and `pigg predict` call.

transformers' `generate()` spends most of a batch outside the matrix products: the prompts are padded
on the left, so every prefill layer attends through a padding mask (SDPA's slower kernels), the vision
tower attends image by image, and each of the ~40 decoding steps launches some 600 small kernels from
Python while the weights and the cache it reads take a few milliseconds. Here:

- Prefill: rows are padded on the right and given no mask. Causal attention alone gives every real
  token what it got before (padding only ever follows it), so SDPA runs its causal kernel. The images'
  3-D rotary positions are what transformers computes without a mask, where the padding counts as text
  after the prompt: each row's position offset for the answer (`rope_deltas`) is then what it is
  without padding. Evaluation's collator computes them in its DataLoader workers
  (`pigg.data.collate.rope_positions`, the batch's `position_ids`); else the model computes them. The
  vision tower attends same-sized images in one call (`pigg.fast.vision`, as in training). Where a GPU
  and liger-kernel are there (`liger=None`, as `fast.liger_kernel`), the language model's RMSNorm, RoPE
  and SwiGLU run Liger's fused kernels (`pigg.fast.liger.prefill_kernels`). Logits are taken at each
  row's last prompt token only.
- Decoding: the prefill's keys and values go into a static cache (rows x [prompt slots | answer slots]);
  slot validity is a mask, so each row's padding is never attended. One decoding step (embedding, 36
  layers, argmax, stop test) reads and writes only fixed buffers, so on a GPU it is captured once as a
  CUDA graph and replayed: one launch per token, and the CPU waits for the GPU only every few tokens to
  see whether every row has stopped.

The answers are transformers' greedy answers (`tests/test_generation.py` compares them token for token
on the tiny model): the same stop tokens (<|im_end|> and the pad token) and the same ban on them before
`min_new_tokens`. Any padding side is accepted; left-padded rows are moved to the right.

Sampled answers (`Generator(..., sampling=Sampling(temperature, top_p, top_k))`, what `pigg rl` draws its
groups with) follow transformers' `generate(do_sample=True)`: the banned tokens, then the temperature,
top-k and top-p cuts in its order, then one draw from what is left (as an argmax of the probabilities over
exponential noise, which a CUDA graph can hold). Rows equal to the row before them, GRPO's G copies of a
prompt, are prefilled once and their keys and values copied (`shared_prompts`).

`Generator(model, processor, max_new_tokens)` keeps its cache and graph between batches (evaluation
makes one per run); `generate_answers(model, processor, batch, max_new_tokens)` answers one batch.
"""
import contextlib
import dataclasses
import itertools

import torch
import torch.nn.functional as F
from transformers.models.qwen3_vl import modeling_qwen3_vl

from pigg.fast import cudnn_attention
from pigg.fast.liger import prefill_kernels, use_liger
from pigg.fast.vision import batched_vision_attention, deepstack_without_waits, linear_patch_embedding
from pigg.model.loading import unwrapped

# Prompt slots come in multiples of this, so batches of slightly different lengths share one graph.
PROMPT_SLOTS = 64
# The CPU checks whether every row has stopped once every this many tokens (a wait for the GPU).
STOP_CHECK_EVERY = 8


def generate_answers(model, processor, batch: dict, max_new_tokens: int, min_new_tokens: int = 0) -> list[str]:
    """Greedy answers to one batch of the processor's output (any padding side), decoded without
    special tokens."""
    return Generator(model, processor, max_new_tokens, min_new_tokens)(batch)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling instead of greedy choice: the logits of the `banned` tokens set to -inf, divided by the
    temperature, cut to the top_k most likely tokens (0: no cut) and to the smallest set holding top_p of
    the probability, as transformers' SuppressTokens, Temperature, TopK and TopP processors do."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    banned: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"generation: the sampling temperature must be above 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"generation: top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"generation: top_k must be 0 (no cut) or more, got {self.top_k}")


def sampling_cuts(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The logits (rows x vocabulary, float32) after the temperature and the top-k and top-p cuts (cut
    tokens at -inf). Graph-safe: no host-device copies, fixed shapes."""
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        ascending, order = logits.sort(dim=-1)
        cut = ascending.softmax(-1).cumsum(-1) <= 1 - sampling.top_p
        cut[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(cut.scatter(1, order, cut), float("-inf"))
    return logits


def draw(logits: torch.Tensor) -> torch.Tensor:
    """One token a row, drawn with probability softmax(logits): the argmax of the probabilities over
    exponential noise (the exponential race), a fixed-shape draw that a CUDA graph captures."""
    probs = logits.softmax(-1)
    noise = torch.empty_like(probs).exponential_().clamp_min_(1e-20)
    return (probs / noise).argmax(-1)


def stop_ids(tokenizer) -> list[int]:
    """Tokens that end an answer: the end of the assistant's turn and the pad token (as in evaluation)."""
    return [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id]


def right_padded(batch: dict) -> tuple[dict, torch.Tensor]:
    """The batch with every row's tokens moved to the front (padding behind), and the rows' lengths.
    Raises if a row's attention mask has a hole (padding between real tokens)."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1)
    width = mask.shape[1]
    front = torch.arange(width) < lengths[:, None]
    if (mask == front).all():
        return batch, lengths
    if "position_ids" in batch:
        raise ValueError("generation: rotary positions were given for rows not padded on the right")
    start = mask.int().argmax(1)  # first real token of each row
    columns = torch.arange(width)
    if not (mask == ((columns >= start[:, None]) & (columns < (start + lengths)[:, None]))).all():
        raise ValueError("generation: an attention mask row has padding between real tokens")
    index = (columns[None] + start[:, None]) % width  # rotate each row left by its padding
    moved = dict(batch)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in batch:
            moved[key] = batch[key].gather(1, index)
    return moved, lengths


def shared_prompts(batch: dict, vision_start: int) -> tuple[dict, torch.Tensor | None]:
    """Rows equal to the row before them (the same tokens and the same images), such as GRPO's G copies
    of each prompt, need one prefill between them. Returns the batch of the other rows (right-padded, as
    given) and, for every row of `batch`, the row of that batch that stands for it; (batch, None) when
    every row stands for itself. Videos are not compared: a batch with any is returned whole."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = len(ids)
    repeats = [i > 0 and torch.equal(ids[i], ids[i - 1]) and torch.equal(mask[i], mask[i - 1]) for i in range(rows)]
    if not any(repeats) or any(k.startswith("video") for k in batch):
        return batch, None
    images = (ids == vision_start).sum(1).tolist()  # each image opens with <|vision_start|>
    grids = batch.get("image_grid_thw")
    if sum(images) != (0 if grids is None else len(grids)):
        return batch, None
    first_image = [0]
    for count in images:
        first_image.append(first_image[-1] + count)
    patch_end = [0] + (grids.prod(-1).cumsum(0).tolist() if grids is not None else [])

    def pixels(row):
        return batch["pixel_values"][patch_end[first_image[row]]:patch_end[first_image[row + 1]]]

    def grid(row):
        return grids[first_image[row]:first_image[row + 1]]

    for i in range(1, rows):
        if repeats[i] and images[i]:
            repeats[i] = torch.equal(grid(i), grid(i - 1)) and torch.equal(pixels(i), pixels(i - 1))
    if not any(repeats):
        return batch, None
    kept = [i for i in range(rows) if not repeats[i]]
    source = torch.tensor(list(itertools.accumulate(not r for r in repeats))) - 1
    distinct = {k: v[kept] for k, v in batch.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "position_ids" in batch:
        distinct["position_ids"] = batch["position_ids"][:, kept]
    if grids is not None:
        distinct["image_grid_thw"] = torch.cat([grid(i) for i in kept])
        distinct["pixel_values"] = torch.cat([pixels(i) for i in kept])
    unknown = set(batch) - set(distinct) - {"pixel_values", "image_grid_thw"}
    if unknown:
        raise ValueError(f"generation: cannot share the prefill of rows with inputs {sorted(unknown)}")
    return distinct, source


class Generator:
    """Greedy (or, with `sampling`, sampled) decoding with a static cache; on a GPU the decoding step is a
    CUDA graph, captured for each (rows, prompt slots) and kept for the next batch of that shape. `stop`
    replaces the tokens that end an answer (default: `stop_ids`)."""

    def __init__(self, model, processor, max_new_tokens: int, min_new_tokens: int = 0, graphs: bool | None = None,
                 liger: bool | None = None, sampling: Sampling | None = None, stop: list[int] | None = None):
        if max_new_tokens < 1:
            raise ValueError(f"generation: max_new_tokens must be at least 1, got {max_new_tokens}")
        self.core = unwrapped(model)
        self.tokenizer = processor.tokenizer
        self.max_new, self.min_new = max_new_tokens, min_new_tokens
        self.stop = list(stop) if stop is not None else stop_ids(self.tokenizer)
        self.sampling = sampling
        self.vision_start = self.core.config.vision_start_token_id
        self.device = self.core.lm_head.weight.device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        self.state = None  # the static buffers (and graph) of the last batch shape
        # bench/eval_gpu.py switches these to measure what each saves: batched vision attention, Liger's
        # kernels in the prefill (None: where liger-kernel is installed and the model is on a GPU) and a
        # cuDNN choice for attention (True or False; None leaves PyTorch's).
        self.vision_batched = True
        self.liger = use_liger(liger) and self.device.type == "cuda"
        self.cudnn = None
        self.pixel_dtype = self.core.model.visual.dtype

    def close(self) -> None:
        """Free the cache and the graph (they are rebuilt by the next call)."""
        self.state = None

    def __call__(self, batch: dict) -> list[str]:
        """The answers' texts, without the stop token and special tokens."""
        return self.texts(self.tokens(batch))

    def answer_ids(self, batch: dict) -> list[list[int]]:
        """Each answer's token ids up to and including its first stop token (all of them if none)."""
        return self.cut(self.tokens(batch), keep_stop=True)

    @torch.inference_mode()
    def tokens(self, batch: dict) -> torch.Tensor:
        """Answer tokens (rows x max_new_tokens); after a row's stop token the rest of its row is unused."""
        batch, lengths = right_padded(batch)
        distinct, source = shared_prompts(batch, self.vision_start)
        logits, cache, deltas = self.prefill(distinct, distinct["attention_mask"].sum(1))
        if source is not None:
            source = source.to(self.device)
            logits, deltas = logits[source], deltas[source]
        state = self.state_for(len(lengths), batch["input_ids"].shape[1])
        state.load(cache, lengths.to(self.device), deltas, logits, source)
        del cache
        return self.decode(state)

    def prefill(self, batch: dict, lengths: torch.Tensor):
        """The first answer token's logits (float32), the prompt's keys and values, and each row's
        position offset for the answer."""
        core, dev = self.core, self.device
        positions = batch.get("position_ids")  # computed by the collator (pigg.data.collate.rope_positions)
        inputs = {k: v.to(dev, non_blocking=True) for k, v in batch.items() if k != "attention_mask"}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.pixel_dtype)
        visual = core.model.visual
        with (batched_vision_attention(visual, self.vision_batched), linear_patch_embedding(visual),
              deepstack_without_waits(), prefill_kernels(core, self.liger),
              cudnn_attention(self.cudnn) if self.cudnn is not None else contextlib.nullcontext()):
            out = core.model(**inputs, use_cache=True)
        cache = getattr(out, "cache", None)  # transformers 5.24; 5.17 names it past_key_values
        cache = out.past_key_values if cache is None else cache
        rows = torch.arange(len(lengths), device=dev)
        last = out.last_hidden_state[rows, lengths.to(dev) - 1]
        logits = core.lm_head(last).float()
        if positions is not None:  # padding counts as text after the prompt, so the row's last position tells
            deltas = (positions.amax((0, 2)) + 1 - positions.shape[2]).to(dev, non_blocking=True)
        elif "image_grid_thw" in inputs or "video_grid_thw" in inputs:
            deltas = core.model.rope_deltas.reshape(-1).to(dev)
        else:  # text only: positions are plain, nothing was computed
            deltas = torch.zeros(len(lengths), dtype=torch.long, device=dev)
        return logits, cache, deltas

    def state_for(self, rows: int, width: int) -> "DecodeState":
        slots = -(-width // PROMPT_SLOTS) * PROMPT_SLOTS
        if self.state is None or (self.state.rows, self.state.prompt_slots) != (rows, slots):
            self.state = None  # free the old buffers before taking new ones
            self.state = DecodeState(self.core, rows, slots, self.max_new, self.min_new, self.stop, self.device,
                                     self.sampling)
            if self.graphs:
                self.state.capture()
        return self.state

    def decode(self, state: "DecodeState") -> torch.Tensor:
        for step in range(1, self.max_new):
            if self.graphs:
                state.replay()
            else:
                state.step()
            if step % STOP_CHECK_EVERY == 0 and bool(state.stopped.all()):
                break
        return state.tokens.cpu()

    def texts(self, tokens: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode(self.cut(tokens, keep_stop=False), skip_special_tokens=True)

    def cut(self, tokens: torch.Tensor, keep_stop: bool) -> list[list[int]]:
        """Each row up to its first stop token (with it if keep_stop); the whole row if it has none."""
        rows = []
        for row in tokens.tolist():
            ends = [i for i, t in enumerate(row) if t in self.stop]
            rows.append(row[:ends[0] + keep_stop] if ends else row)
        return rows


class DecodeState:
    """Fixed buffers for one batch shape, and the decoding step that reads and writes only them.

    Slots 0..prompt_slots-1 hold each row's prompt (a row of length n uses 0..n-1; the rest are
    masked); slot prompt_slots + j holds the key and value of answer token j."""

    def __init__(self, core, rows: int, prompt_slots: int, max_new: int, min_new: int, stop: list[int], device,
                 sampling: Sampling | None = None):
        text = core.model.language_model
        cfg = text.config
        self.core, self.text = core, text
        self.rows, self.prompt_slots, self.max_new, self.min_new = rows, prompt_slots, max_new, min_new
        slots = prompt_slots + -(-max_new // 16) * 16  # a multiple of 16 keeps SDPA's mask aligned
        kv_heads = cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
        dtype = text.embed_tokens.weight.dtype
        # Zeros, not empty: a masked slot gets weight 0, and 0 x NaN would still be NaN.
        self.keys = [torch.zeros(rows, kv_heads, slots, head_dim, dtype=dtype, device=device) for _ in text.layers]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.valid = torch.zeros(rows, slots, dtype=torch.bool, device=device)
        self.tokens = torch.zeros(rows, max_new, dtype=torch.long, device=device)
        self.stopped = torch.zeros(rows, dtype=torch.bool, device=device)
        self.first_position = torch.zeros(rows, dtype=torch.long, device=device)
        self.index = torch.zeros((), dtype=torch.long, device=device)  # answer token fed into the next step
        self.stop = torch.tensor(stop, device=device)
        self.sampling = sampling
        self.banned = torch.tensor(sampling.banned if sampling else [], dtype=torch.long, device=device)
        self.graph = None

    def load(self, cache, lengths: torch.Tensor, deltas: torch.Tensor, logits: torch.Tensor,
             source: torch.Tensor | None = None) -> None:
        """Take a prefill: its keys and values, the rows' valid slots and first answer token. `source`:
        for each row, the prefilled row that holds its prompt (None: the same row)."""
        source = None if source is None else source.to(self.keys[0].device)
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            done = cache.layers[layer]
            width = done.keys.shape[2]
            for into, prefilled in ((keys, done.keys), (values, done.values)):
                into[:, :, :width].copy_(prefilled if source is None else prefilled.index_select(0, source))
            done.keys = done.values = None  # free the prefill's copy as we go
        slots = torch.arange(self.valid.shape[1], device=lengths.device)
        self.valid.copy_(slots[None] < lengths[:, None])
        self.first_position.copy_(lengths + deltas)
        self.index.zero_()
        self.stopped.zero_()
        self.tokens.zero_()
        self.tokens[:, 0] = self.choose(logits, 0)
        self.stopped |= self.stops(self.tokens[:, 0])

    def choose(self, logits: torch.Tensor, index) -> torch.Tensor:
        """Answer token `index`, greedy or sampled, with the stop tokens banned before min_new_tokens."""
        early = torch.as_tensor(index, device=logits.device) < self.min_new
        logits[:, self.stop] = logits[:, self.stop].masked_fill(early, float("-inf"))
        if self.sampling is None:
            return logits.argmax(-1)
        logits.index_fill_(1, self.banned, float("-inf"))  # a scalar fill: no host-to-device copy in a graph
        return draw(sampling_cuts(logits, self.sampling))

    def stops(self, chosen: torch.Tensor) -> torch.Tensor:
        return (chosen[:, None] == self.stop).any(-1)

    def step(self) -> None:
        """Feed answer token `index`, choose token `index` + 1 (fixed buffers only: graph-safe)."""
        text, rows = self.text, self.rows
        slot = (self.prompt_slots + self.index).reshape(1)
        token = self.tokens.gather(1, self.index.reshape(1, 1).expand(rows, 1))
        hidden = text.embed_tokens(token)  # (rows, 1, hidden)
        positions = (self.first_position + self.index).reshape(1, rows, 1).expand(3, rows, 1)
        cos, sin = text.rotary_emb(hidden, positions)
        self.valid.index_fill_(1, slot, True)
        mask = self.valid[:, None, None, :]
        for layer, keys, values in zip(text.layers, self.keys, self.values):
            normed = layer.input_layernorm(hidden)
            hidden = hidden + self.attend(layer.self_attn, normed, cos, sin, keys, values, slot, mask)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits = self.core.lm_head(text.norm(hidden)[:, 0]).float()
        chosen = self.choose(logits, self.index + 1)
        self.index += 1
        self.tokens.index_copy_(1, self.index.reshape(1), chosen[:, None])
        self.stopped |= self.stops(chosen)

    def attend(self, attn, hidden, cos, sin, keys, values, slot, mask) -> torch.Tensor:
        """Qwen3VLTextAttention.forward for one new token per row against the static cache. The query
        heads that share a key head are laid out as that head's queries (no copies of the cache)."""
        rows = hidden.shape[0]
        shape = (rows, 1, -1, attn.head_dim)
        query = attn.q_norm(attn.q_proj(hidden).view(shape)).transpose(1, 2)
        key = attn.k_norm(attn.k_proj(hidden).view(shape)).transpose(1, 2)
        value = attn.v_proj(hidden).view(shape).transpose(1, 2)
        query, key = modeling_qwen3_vl.apply_rotary_pos_emb(query, key, cos, sin)
        keys.index_copy_(2, slot, key)
        values.index_copy_(2, slot, value)
        grouped = query.reshape(rows, keys.shape[1], -1, attn.head_dim)  # (rows, kv heads, group, head_dim)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=attn.scaling)
        return attn.o_proj(out.reshape(rows, 1, -1))

    def capture(self) -> None:
        """Run the step once (kernels load, workspaces are taken), then record it as a CUDA graph. The
        warm-up's writes are undone by the next `load`."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread may allocate pinned memory meanwhile
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.step()

    def replay(self) -> None:
        self.graph.replay()


@contextlib.contextmanager
def released(generator: Generator | None):
    """`generator`'s cache and graph are freed when the block ends (evaluation's whole loop)."""
    try:
        yield generator
    finally:
        if generator is not None:
            generator.close()
