"""Global fine-tuning recipe: validate data -> load -> freeze -> adapt -> train -> save.

Reads top to bottom; `train()` is the whole run. Uses Hugging Face's Trainer with the seed's
arguments, so checkpoints, resumption and schedules are the stock ones; the loss keeps the seed's
normalisation at any micro-batch size (`supervised_loss`).
"""
import contextlib
import dataclasses
import itertools
import json
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, set_seed
from transformers.integrations import TensorBoardCallback

from pigg import config as C
from pigg.batching import BatchPlan, GiB, estimator, plan_batch, world_size
from pigg.collate import TrainCollator, sample_length, supervised_index
from pigg.data import load_samples
from pigg.distributed import (describe, is_main, load_optimizer_across_layouts, load_weights_across_layouts, strategy,
                              trainer_arguments, use_local_gpu, written_with_fsdp)
from pigg.logs import log_path, quiet_stdout, tee_output
from pigg.lora import fused_adapters
from pigg.masking import IGNORE_INDEX
from pigg.model import format_counts, load_model, parameter_counts, prepare_model
from pigg.processor import load_processor, save_processor
from pigg.provenance import write_provenance
from pigg.rms_norm import wider_rms_norm_backward
from pigg.users import format_users
from pigg.vision import (batched_vision_attention, batches_attention, deepstack_without_waits, linear_patch_embedding,
                         vision_without_autocast)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def train(cfg: C.RunConfig, callbacks=()) -> Path:
    """Run global fine-tuning; return the output folder."""
    C.validate(cfg)
    use_local_gpu()
    if not is_main():  # with several processes rank 0 speaks for all; the others' errors still reach stderr
        with quiet_stdout():
            return _train(cfg, list(callbacks))
    with tee_output(log_path(cfg.train.log_dir, f"finetune_global_{cfg.train.method}")) as log_file:
        print(f"pigg train: log file {log_file}")
        return _train(cfg, list(callbacks))


def _train(cfg, callbacks) -> Path:
    check_compile(cfg.train, world_size())
    out = C.output_folder(cfg)
    resume_from = checkpoint_to_resume(out, cfg.train.resume)
    print_config(cfg)
    samples, sizes = load_samples(cfg.data)
    processor = load_processor(cfg.model.name_or_path, cfg.model.min_pixels, cfg.model.max_pixels)
    lengths = check_lengths(processor, samples, sizes, cfg.data.max_length)

    set_seed(cfg.train.seed)  # adapters are initialised before the Trainer would seed anything
    model = load_model(cfg.model, device())
    model = prepare_model(model, cfg.train.method, cfg.lora)
    print(format_counts(parameter_counts(model)))
    out.mkdir(parents=True, exist_ok=True)
    if is_main():
        C.save_yaml(cfg, out / "pigg_config.yaml")
    trainer, plan = fit(model, processor, samples, max(lengths), cfg, out, resume_from, callbacks)

    trainer.save_model(str(out))  # on every process: FSDP gathers the shards into rank 0's one file
    if not is_main():
        return out
    save_processor(processor, out)
    write_provenance(out / "provenance.json", base_model=cfg.model.name_or_path, method=cfg.train.method,
                     users=format_users(sorted({s.user for s in samples})), samples=len(samples),
                     samples_per_user=_per_user(samples), optimizer_steps=trainer.state.global_step,
                     batch_plan=dataclasses.asdict(plan),
                     resumed_from=str(resume_from) if resume_from else None)
    print(f"saved {cfg.train.method} weights, processor, pigg_config.yaml and provenance.json to {out}")
    return out


def fit(model, processor, samples, tokens_per_sample: int, cfg, out: Path, resume_from=None, callbacks=()):
    """Train a prepared model on `samples` with the run's batch plan; checkpoints and TensorBoard
    events go under `out`. Returns the Trainer and the plan."""
    plan = batch_plan(cfg.train, model, tokens_per_sample)
    print(plan.describe())
    if plan.gradient_checkpointing:
        checkpoint_layers(model, plan.checkpointed_layers)
    if cfg.train.torch_compile:
        compile_decoder_layers(model)
    visual = unwrapped(model).model.visual
    trainer = GlobalTrainer(
        logits_on_labels_only=cfg.train.logits_on_labels_only,
        model=model,
        args=training_arguments(cfg, out, plan, model),
        train_dataset=samples,
        data_collator=TrainCollator(processor, cfg.data.max_length, cfg.train.padding_mask, cfg.train.pad_to_multiple,
                                    pixel_dtype=visual.dtype, supervised_index=cfg.train.logits_on_labels_only,
                                    grid_on_cpu=batches_attention(visual, cfg.train.batched_vision_attention)),
        callbacks=[*([TensorBoardCallback(tb_writer=tensorboard_writer(out))] if is_main() else []), *callbacks],
    )
    print_processes(trainer, cfg.train, model)
    with (liger_kernels(model, use_liger(cfg.train.liger_kernel, cfg.train.torch_compile)),
          fused_adapters(model, fuse_adapters(cfg.train), cfg.train.lora_kernels),
          adapter_input_casts(model, trainer.args, cfg.train.lora_input_fp32),
          batched_vision_attention(visual, cfg.train.batched_vision_attention),
          vision_without_autocast(visual, cfg.train.vision_without_autocast),
          linear_patch_embedding(visual),
          deepstack_without_waits(),
          cudnn_attention(cfg.train.cudnn_attention)):
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return trainer, plan


def adapter_input_casts(model, args, fp32: bool):
    """PEFT casts each adapted layer's bf16 input to the adapters' float32 before the dropout, and
    bf16 autocast casts the result back for the matmul: two extra copies of every activation, the
    same values in the end. Under autocast the input can stay bf16 (bench/profile_train_step.py)."""
    if fp32 or not args.bf16 or not hasattr(model, "peft_config"):
        return contextlib.nullcontext()
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model)


@contextlib.contextmanager
def cudnn_attention(on: bool):
    """While training, allow or forbid cuDNN's SDPA kernels (a process-wide switch, restored after)."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(on)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def print_processes(trainer, train_cfg, model) -> None:
    how = strategy(train_cfg, world_size())
    if how == "fsdp" and not trainer.is_fsdp_enabled:
        print("note: accelerate applies FSDP on GPUs only, so these CPU processes run DDP")
        how = "ddp"
    print(f"processes: {describe(how, world_size(), model)}")


def fuse_adapters(train_cfg) -> bool:
    """pigg.lora's fused adapters: asked for, and neither compiled (Inductor fuses on its own) nor with
    the adapters' inputs cast to float32 (which the fused forward leaves to PEFT's)."""
    return train_cfg.fused_lora and not train_cfg.torch_compile and not train_cfg.lora_input_fp32


def use_liger(setting: bool | None, compiled: bool = False) -> bool:
    import importlib.util

    available = device() == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    if setting and not available:
        raise C.ConfigError("train.liger_kernel needs a CUDA GPU and the liger-kernel package "
                            "(pip install 'pigg[fast]')")
    return available and not compiled if setting is None else setting


def check_compile(train_cfg, world: int) -> None:
    """Refuse torch.compile with several processes, before the model is loaded. Each process compiles
    a new graph whenever its micro-batches bring a new variant of the inputs (padding or none, ...),
    at steps of its own, and the others wait for it at the gradient all-reduce. Measured on 4 H100s
    (bench/results/train_multi_gpu_4gpu_h100_*.json): with DDP, steps of 24-32 s between steps of
    0.4 s, not settled after 24 steps; with FSDP, 13 s a step."""
    if train_cfg.torch_compile and world > 1:
        raise C.ConfigError("train.torch_compile works with one process only: with several, each recompiles at "
                            "steps of its own and the others wait (24-32 s steps on 4 H100s); leave it off")


def checkpoint_layers(model, count: int) -> None:
    """Recompute the activations of the first `count` decoder layers in the backward pass (all of them
    when `count` is the number of layers); the other layers keep theirs."""
    # transformers 5.24 renamed it (the old name still works there, with a warning)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    for i, layer in enumerate(unwrapped(model).model.language_model.layers):
        layer.gradient_checkpointing = i < count


def compile_decoder_layers(model) -> None:
    """torch.compile each decoder layer of the language model in place (regional compilation).

    The layers share one code object, so one compiled graph serves all of them; it is recompiled
    only for a new variant of the inputs: the first layer's input needs no gradient, a micro-batch
    with or without padding (attention mask or none), a micro-batch of 1. Shapes are dynamic, so
    a new sequence length reuses the graph. Parameter names, and so checkpoints, are unchanged.
    """
    import torch._dynamo

    layers = unwrapped(model).model.language_model.layers
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 32))
    for layer in layers:
        layer.compile(dynamic=True)
    print(f"torch.compile: {len(layers)} decoder layers (compiled during the first steps)")
    print("note: with LoRA the compiled loss falls faster in the first steps than eager's (12.33 vs 12.97 at step 3 "
          "on the 8B): eager bf16 rounds away most of the adapters' first small updates, compiled keeps them, as "
          "float32 does (bench/compile_grads.py; README, Training speed)")


def unwrapped(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def liger_kernels(model, on: bool):
    """Liger's Triton RMSNorm, RoPE and SwiGLU (SiLU and product in one kernel that keeps only its two
    inputs for the backward) in place of transformers' while training: the same functions, fused. Its
    fused linear cross-entropy stays off: pigg computes logits only at the supervised positions
    already. Liger replaces functions and methods of transformers' Qwen3-VL module for the whole
    process; they are put back afterwards, so a later run in the same process (personalization's next
    fold, a compiled run) gets what it asks for. The model's own RMSNorm layers keep Liger's forward;
    where their weight is frozen (LoRA) the backward is `pigg.rms_norm`'s, which runs on more of the GPU."""
    if not on:
        yield
        return
    from liger_kernel.ops import LigerSiLUMulFunction
    from liger_kernel.transformers import apply_liger_kernel_to_qwen3_vl
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    def swiglu(mlp, x):  # Qwen3VLTextMLP.forward for SiLU
        return mlp.down_proj(LigerSiLUMulFunction.apply(mlp.gate_proj(x), mlp.up_proj(x)))

    patched = [(modeling_qwen3_vl, name) for name in ("apply_rotary_pos_emb", "apply_rotary_pos_emb_vision",
                                                      "Qwen3VLTextRMSNorm")]
    patched.append((modeling_qwen3_vl.Qwen3VLTextMLP, "forward"))
    saved = [(owner, name, getattr(owner, name)) for owner, name in patched]
    apply_liger_kernel_to_qwen3_vl(rope=True, rms_norm=True, cross_entropy=False, fused_linear_cross_entropy=False,
                                   model=unwrapped(model))
    kernels = "RMSNorm and RoPE"
    if liger_swiglu(unwrapped(model).config.get_text_config()):
        modeling_qwen3_vl.Qwen3VLTextMLP.forward = swiglu
        kernels = "RMSNorm, RoPE and SwiGLU"
    try:
        with wider_rms_norm_backward() as wider:
            print(f"Liger kernels: {kernels}"
                  + (" (RMSNorm's input gradient by pigg.rms_norm where its weight is frozen)" if wider else ""))
            yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def liger_swiglu(text_config) -> bool:
    """Whether `liger_kernels` runs the MLP with Liger's SwiGLU (the batch plan counts its memory)."""
    return text_config.hidden_act == "silu"


def print_config(cfg) -> None:
    print(f"method: {cfg.train.method}   model: {cfg.model.name_or_path}   device: {device()}")
    print("resolved config:\n  " + C.yaml.safe_dump(C.to_dict(cfg), sort_keys=False).replace("\n", "\n  "))
    if cfg.train.method == "lora" and cfg.train.learning_rate <= 1e-5:
        print(f"note: LoRA at lr {cfg.train.learning_rate:g} is the seed's value (Qwen's advice for full "
              "fine-tuning); LoRA usually needs about 1e-4 (--lr 1e-4).")


def check_lengths(processor, samples, sizes, max_length: int) -> None:
    """Reject over-long samples before the model is loaded, all at once."""
    lengths = [sample_length(processor, s, sizes)[0] for s in samples]
    too_long = [f"{s.where}: {n} tokens" for s, n in zip(samples, lengths) if n > max_length]
    if too_long:
        raise ValueError(f"{len(too_long)} sample(s) exceed data.max_length={max_length} (never truncated; "
                         "raise --max-length or lower --max-pixels):\n  " + "\n  ".join(too_long))
    print(f"tokens per sample: min {min(lengths)}, mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}")
    return lengths


def batch_plan(train_cfg, model, tokens_per_sample: int) -> BatchPlan:
    """Micro-batch, accumulation and checkpointing for this run (chosen from GPU memory where not given)."""
    text_config = model.config.get_text_config()
    shards = world_size() if strategy(train_cfg, world_size()) == "fsdp" else 1
    swiglu = use_liger(train_cfg.liger_kernel, train_cfg.torch_compile) and liger_swiglu(text_config)
    padded = -(-tokens_per_sample // train_cfg.pad_to_multiple) * train_cfg.pad_to_multiple  # the longest row
    estimate = estimator(model, text_config, padded, shards,
                         keeps_dropped_inputs=not fuse_adapters(train_cfg), liger_swiglu=swiglu)
    return plan_batch(train_cfg, world_size(), gpu_memory(train_cfg), estimate, text_config.num_hidden_layers)


def gpu_memory(train_cfg) -> int | None:
    """Bytes of the GPU this process may use (None on CPU). With `train.gpu_memory_gib` PyTorch's
    allocator is capped there too, so that a run planned for less memory cannot use more."""
    if device() != "cuda":
        return None
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if train_cfg.gpu_memory_gib is None:
        return total
    cap = int(train_cfg.gpu_memory_gib * GiB)
    if cap > total:
        raise C.ConfigError(f"train.gpu_memory_gib {train_cfg.gpu_memory_gib} exceeds this GPU's {total / GiB:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(cap / total)
    return cap


def _per_user(samples) -> dict:
    counts = {}
    for s in samples:
        counts[s.user] = counts.get(s.user, 0) + 1
    return counts


def checkpoint_to_resume(out: Path, resume: bool) -> Path | None:
    """The newest complete checkpoint when resuming; refuse to overwrite one otherwise."""
    folder = out / "checkpoints"
    found = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])) if folder.is_dir() else []
    if found and not resume:
        raise FileExistsError(f"{folder} holds checkpoints of an earlier run: pass --resume to continue it, "
                              "or choose another --output-dir")
    complete = [p for p in found if _complete(p)]
    for p in found:
        if p not in complete and is_main():  # one process removes it; the others only skip it
            print(f"WARNING: {p} is incomplete (interrupted while saving); removing it")
            shutil.rmtree(p)
    if resume and not complete:
        print(f"--resume: no complete checkpoint in {folder}; starting from the beginning")
    if complete:
        print(f"resuming from {complete[-1]}")
    return complete[-1] if complete else None


def _complete(checkpoint: Path) -> bool:
    # The Trainer writes trainer_state.json last; a checkpoint without a readable one was cut short.
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def tensorboard_writer(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out / "tensorboard"))


def training_arguments(cfg, out: Path, plan: BatchPlan, model=None) -> TrainingArguments:
    t = cfg.train
    on_gpu = device() == "cuda"
    how = strategy(t, world_size())
    # Under FSDP accelerate's bf16 mode would upcast the trained weights to fp32 master copies (16 bytes
    # per parameter with AdamW: 66 GB per GPU for the 8B on 2 GPUs); without it FSDP trains the bf16
    # weights as one GPU does, so 1 and N GPUs run the same recipe.
    bf16 = on_gpu and cfg.model.dtype in ("auto", "bfloat16") and how != "fsdp"
    extra = trainer_arguments(how, model)  # DDP or FSDP with several processes
    # accelerate copies each batch to the GPU; pinned (on a GPU), without waiting for the GPU to finish
    # the step before: the CPU goes on to launch the next one
    accelerator = {**extra.pop("accelerator_config", {}), "non_blocking": on_gpu}
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.grad_accum,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        bf16=bf16,
        use_cpu=not on_gpu,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="no",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        # The stock filter tests every micro-batch's loss for NaN on the CPU: the CPU waits for the
        # backward to finish, and the GPU then idles through the optimizer's and the next step's Python.
        # Off, a NaN or infinite loss is logged as it is.
        logging_nan_inf_filter=False,
        report_to="none",
        optim=t.optimizer,
        dataloader_num_workers=t.dataloader_workers,
        dataloader_prefetch_factor=4 if t.dataloader_workers else None,
        dataloader_pin_memory=on_gpu,
        dataloader_persistent_workers=t.dataloader_workers > 0,
        remove_unused_columns=False,
        seed=t.seed,
        data_seed=t.seed,
        accelerator_config=accelerator,
        **extra,
    )


def supervised_loss(model, inputs: dict, samples_in_step=None, labels_only: bool = True):
    """The seed's loss at any micro-batch size: each sample's mean over its supervised tokens, summed
    over the micro-batch and divided by the samples of the whole optimizer step.

    That is what the stock Trainer computes for Qwen3-VL at micro-batch 1 (the model's own token-mean
    loss, divided by the accumulation steps); a plain token-mean over a larger micro-batch would weight
    long answers more. With `labels_only` the lm_head runs on the ~30 supervised positions of each
    sample instead of all ~1,100 (where the collator found them, if it did: `supervised_index`); the
    value is the same.
    """
    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "supervised_index")}
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    if labels_only:
        index = inputs.get("supervised_index")
        if index is None:
            index = supervised_index(labels)
        with logits_at(model, index):
            outputs = model(**model_inputs, use_cache=False)
        token_loss = torch.nn.functional.cross_entropy(outputs.logits.float(), labels.reshape(-1)[index + 1],
                                                       reduction="none")
        per_token = token_loss / counts[index // labels.shape[1]]  # each token's share of its sample's mean
        loss = per_token.sum()
    else:
        outputs = model(**model_inputs, use_cache=False)
        token_loss = torch.nn.functional.cross_entropy(outputs.logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                                                       ignore_index=IGNORE_INDEX, reduction="none")
        loss = (token_loss.sum(1) / counts.clamp(min=1)).sum()
    return loss / (samples_in_step if samples_in_step is not None else len(labels)), outputs


@contextlib.contextmanager
def logits_at(model, index: torch.Tensor):
    """While in the block, the model's lm_head computes logits only for the hidden states at `index`,
    in the rows and positions flattened: (tokens, vocabulary) instead of (rows, positions, vocabulary).
    Per row, not at the union of the rows' positions: the answers end rows of different lengths, so
    that union holds about 8 positions for each one a row needs at micro-batch 8."""
    head = getattr(model, "module", model).get_output_embeddings()  # DDP's module, or the model
    hook = head.register_forward_pre_hook(lambda module, args: (args[0].reshape(-1, args[0].shape[-1])[index],))
    try:
        yield
    finally:
        hook.remove()


class GlobalTrainer(Trainer):
    """The stock Trainer with the seed's loss normalisation at any micro-batch size (see
    `supervised_loss`), the supervised-token count of each optimizer step in its logs, (by
    default) logits only where tokens are supervised, and resumption of a checkpoint written with or
    without FSDP by a run with the other (a different number of GPUs)."""

    def __init__(self, *args, logits_on_labels_only: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.logits_on_labels_only = logits_on_labels_only
        self._flop_parameters = None  # the model's parameters other than embeddings, counted at the first step
        # The loss below is already normalised over the step: the Trainer must not divide it again.
        self.model_accepts_loss_kwargs = True

    def floating_point_ops(self, inputs) -> int:
        """The stock estimate for `total_flos`, 6 x input tokens x parameters other than embeddings, with
        the parameters counted once: the stock method counts the 8B's again for every micro-batch, ~10 ms
        on the CPU while the GPU waits between steps (bench/profile_train_step.py)."""
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._flop_parameters is None:
            self._flop_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main].numel() * self._flop_parameters

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step, and how many samples they hold over all processes:
        a number for one process (a tensor made on the GPU would wait for it to finish the last step)."""
        # The stock version also counts (and gathers) supervised tokens, which this loss does not use.
        batches = list(itertools.islice(epoch_iterator, num_batches))
        samples = sum(len(b["labels"]) for b in batches)
        if self.args.world_size > 1:
            return batches, self.accelerator.gather(torch.tensor(samples, device=device)).sum()
        return batches, samples

    def _prepare_inputs(self, inputs):
        """The stock move to the device; the images' grid as a CPU tensor where the collator gave it as
        numbers too (`TrainCollator`'s `grid_on_cpu`): the vision tower and the model read it as Python
        numbers, from a GPU tensor each a wait for the GPU at the start of every forward."""
        inputs = super()._prepare_inputs(inputs)
        if "image_grid_rows" in inputs:
            inputs["image_grid_thw"] = torch.tensor(inputs.pop("image_grid_rows"), dtype=torch.long)
        return inputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Accumulate on the device: no host sync per micro-batch.
        count = (inputs["labels"] != IGNORE_INDEX).sum()
        if getattr(self, "_supervised", None) is None:
            self._supervised, self._window_start = count, self.state.global_step
        else:
            self._supervised = self._supervised + count
        loss, outputs = supervised_loss(model, inputs, num_items_in_batch, self.logits_on_labels_only)
        if self.args.world_size > 1 and num_items_in_batch is not None:
            # DDP and FSDP average the gradients over processes; the sum over the step's samples is wanted
            loss = loss * self.args.world_size
        return (loss, outputs) if return_outputs else loss

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        written = written_with_fsdp(resume_from_checkpoint)
        if written == self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        print(f"{resume_from_checkpoint} was written {'with' if written else 'without'} FSDP and this run "
              f"{'uses' if self.is_fsdp_enabled else 'does not use'} it: converting weights and optimizer state")
        load_weights_across_layouts(model or self.model, resume_from_checkpoint, into_fsdp=self.is_fsdp_enabled)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        if written_with_fsdp(checkpoint) != self.is_fsdp_enabled:
            load_optimizer_across_layouts(self.model, self.optimizer, checkpoint, into_fsdp=self.is_fsdp_enabled)
        elif self.args.world_size > 1 and self.args.device.type == "cpu" and not self.is_fsdp_enabled:
            # the Trainer would map the state onto accelerate's device "cpu:RANK", which torch.load cannot restore
            self.optimizer.load_state_dict(torch.load(Path(checkpoint) / "optimizer.pt", map_location="cpu",
                                                      weights_only=True))
        else:
            return super()._load_optimizer_and_scheduler(checkpoint)
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / "scheduler.pt", weights_only=True))

    def log(self, logs, *args, **kwargs):
        # Called on every process (the loss is gathered just before), so the count can be summed over them.
        if "loss" in logs and getattr(self, "_supervised", None) is not None:
            steps = max(1, self.state.global_step - self._window_start)
            supervised = self._supervised
            if self.args.world_size > 1:
                supervised = self.accelerator.reduce(supervised, reduction="sum")
            logs["supervised_tokens_per_step"] = round(float(supervised) / steps, 1)
            self._supervised = None
            if torch.cuda.is_available():
                logs["peak_gpu_gib"] = self._peak_gpu_gib()
        super().log(logs, *args, **kwargs)

    def _peak_gpu_gib(self) -> float:
        """The most GPU memory any process has held so far (what decides out-of-memory)."""
        peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device=self.args.device)
        if self.args.world_size > 1:
            torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        return round(peak.item(), 1)
