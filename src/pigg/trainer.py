"""The Trainer pigg trains with: the stock Hugging Face Trainer, the seed's loss normalisation at any
micro-batch size, logits only where tokens are supervised, and checkpoints that resume across a change
of GPU count. `train.py` and `personalize.py` both train through it.
"""
import contextlib
import itertools
import json
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from pigg.data.collate import supervised_index
from pigg.data.masking import IGNORE_INDEX
from pigg.distributed import (describe, is_main, load_optimizer_across_layouts, load_weights_across_layouts, strategy,
                              trainer_arguments, world_size, written_with_fsdp)
from pigg.model.batch_plan import BatchPlan
from pigg.model.loading import device


def print_processes(trainer, train_cfg, model) -> None:
    how = strategy(train_cfg, world_size())
    if how == "fsdp" and not trainer.is_fsdp_enabled:
        print("note: accelerate applies FSDP on GPUs only, so these CPU processes run DDP")
        how = "ddp"
    print(f"processes: {describe(how, world_size(), model)}")


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


class RunFinished(Exception):
    """The checkpoint a run resumes from already holds all of its optimizer steps."""


class StopIfFinished(TrainerCallback):
    # on_train_begin comes after the Trainer has loaded the checkpoint's weights, optimizer and state
    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps > 0:
            raise RunFinished


def train_from(trainer, checkpoint: Path | None) -> None:
    """`trainer.train()`, resumed from `checkpoint` when one is given. A checkpoint that already holds every
    optimizer step of the run is loaded and nothing more is trained: the Trainer itself would take one
    more step before it looks at max_steps (a finished run resumed with --max-steps grew by a step)."""
    if checkpoint is None:
        trainer.train()
        return
    trainer.add_callback(StopIfFinished)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    except RunFinished:
        print(f"{checkpoint} holds all {trainer.state.max_steps} optimizer steps of this run: nothing more to train")
    finally:
        trainer.remove_callback(StopIfFinished)


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
        the parameters counted once: the stock method counts the 8B's again for every micro-batch, on the
        CPU while the GPU waits between steps."""
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
