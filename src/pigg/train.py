"""Global fine-tuning recipe: validate data -> load -> freeze -> adapt -> fit -> save.

`train()` is the whole run and reads top to bottom. It trains with Hugging Face's Trainer and the
seed's arguments (`pigg.trainer`), so checkpoints, resumption and schedules are the stock ones, under
the speed patches of `pigg.fast`.
"""
import dataclasses
from pathlib import Path

from transformers import set_seed
from transformers.integrations import TensorBoardCallback

from pigg import config as C
from pigg.data.collate import TrainCollator, sample_length
from pigg.data.processor import load_processor, save_processor
from pigg.data.samples import load_samples
from pigg.data.users import format_users
from pigg.distributed import is_main, use_local_gpu, world_size
from pigg.fast import speedups
from pigg.fast.compile import check_compile, compile_decoder_layers
from pigg.fast.vision import batches_attention
from pigg.logs import log_path, quiet_stdout, tee_output
from pigg.model.batch_plan import batch_plan, checkpoint_layers
from pigg.model.loading import device, format_counts, load_model, parameter_counts, prepare_model, unwrapped
from pigg.provenance import write_provenance
from pigg.trainer import (GlobalTrainer, checkpoint_to_resume, print_processes, tensorboard_writer, train_from,
                          training_arguments)


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
    check_compile(cfg.fast, world_size())
    out = C.output_folder(cfg)
    resume_from = checkpoint_to_resume(out, cfg.train.resume)
    print_config(cfg)
    samples, sizes = load_samples(cfg.data)
    processor = load_processor(cfg.model.name_or_path, cfg.model.min_pixels, cfg.model.max_pixels)
    lengths = check_lengths(processor, samples, sizes, cfg.data.max_length)

    set_seed(cfg.train.seed)  # adapters are initialised before the Trainer would seed anything
    model = load_model(cfg.model, device())
    model = prepare_model(model, cfg.train.method, cfg.lora, cfg.train.vision)
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
    plan = batch_plan(cfg, model, tokens_per_sample)
    print(plan.describe())
    if plan.gradient_checkpointing:
        checkpoint_layers(model, plan.checkpointed_layers)
    if cfg.fast.torch_compile:
        compile_decoder_layers(model)
    visual = unwrapped(model).model.visual
    fast = frozen_tower_switches(cfg.fast, visual)
    trainer = GlobalTrainer(
        logits_on_labels_only=fast.logits_on_labels_only,
        model=model,
        args=training_arguments(cfg, out, plan, model),
        train_dataset=samples,
        data_collator=TrainCollator(processor, cfg.data.max_length, fast.padding_mask, fast.pad_to_multiple,
                                    pixel_dtype=visual.dtype, supervised_index=fast.logits_on_labels_only,
                                    grid_on_cpu=batches_attention(visual, fast.batched_vision_attention)),
        callbacks=[*([TensorBoardCallback(tb_writer=tensorboard_writer(out))] if is_main() else []), *callbacks],
    )
    print_processes(trainer, cfg.train, model)
    with speedups(model, fast, trainer.args):
        train_from(trainer, resume_from)
    return trainer, plan


def frozen_tower_switches(fast, visual):
    """`fast`, with the speed switches written for a frozen vision tower off where the tower trains
    (`train.vision`): the batched attention's rotary kernel and the tower's forward outside autocast."""
    if not any(p.requires_grad for p in visual.parameters()):
        return fast
    if fast.batched_vision_attention or fast.vision_without_autocast:
        print("note: the vision tower trains (train.vision), so fast.batched_vision_attention and "
              "fast.vision_without_autocast are off")
    return dataclasses.replace(fast, batched_vision_attention=False, vision_without_autocast=False)


def print_config(cfg) -> None:
    lr = cfg.train.learning_rate
    by_method = " (pigg's default for this method)" if lr == C.LEARNING_RATES.get(cfg.train.method) else ""
    print(f"method: {cfg.train.method}   learning rate: {lr:g}{by_method}   model: {cfg.model.name_or_path}   "
          f"device: {device()}")
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


def _per_user(samples) -> dict:
    counts = {}
    for s in samples:
        counts[s.user] = counts.get(s.user, 0) + 1
    return counts
