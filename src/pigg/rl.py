"""Reinforcement fine-tuning recipe (GRPO with a click reward): validate data -> load the starting
model -> freeze -> adapt -> sample, reward, update -> save.

Engine: TRL's GRPOTrainer (the stock Hugging Face Trainer underneath, as `pigg train`): for each prompt
it samples G answers (with pigg's generator, `pigg.grpo`; `rl.sampler: transformers` for TRL's
generate()), scores them with pigg's rewards (`pigg.grounding.rewards`), normalises the rewards within
each group into advantages and minimises the clipped policy loss plus beta x KL to the starting model.
Checkpoints, `--resume`, schedules, DDP under `pigg.distributed`'s launcher and TensorBoard are the
Trainer's. pigg supplies the data (its validated per-user samples), the rewards, the starting model, the
adapters and the sampling; TRL builds the prompts with the processor's chat template, the same one
pigg's collators render with.

Where it starts (`rl.start`): the base model (a fresh LoRA), a global LoRA output (its adapter trains
on: the output is again one adapter on the base, for `pigg eval --adapter`), a full global output or
a full personalized fold (a fresh LoRA on those weights), or a LoRA personalized fold (the global
adapter merged into the base, the fold's adapter trains on: like the fold itself, the output applies
on top of the global adapter, `pigg export --adapter GLOBAL --adapter OUT`). With beta > 0 TRL keeps a
frozen copy of the starting adapter as the reference of the KL penalty.

Output, OUT/rl_agent_lora/: the adapter, processor, pigg_config.yaml, provenance.json, tensorboard/
(mean reward, hit rate, format rate, KL, answer length per logged step) and checkpoints/.
"""
import copy
import dataclasses
import json
import shutil
from pathlib import Path

import torch
from transformers import set_seed
from transformers.integrations import TensorBoardCallback

from pigg import config as C
from pigg.data.processor import load_processor, save_processor
from pigg.data.samples import Sample, images_of, load_samples, open_image
from pigg.data.users import format_users
from pigg.distributed import is_main, use_local_gpu, world_size
from pigg.evaluate import prompt_and_truth
from pigg.grounding import rewards as R
from pigg.logs import log_path, quiet_stdout, tee_output
from pigg.model.loading import (assert_no_adapter_in_vision, device, format_counts, freeze_vision, load_for_inference,
                                load_model, parameter_counts, prepare_model)
from pigg.provenance import write_provenance
from pigg.trainer import checkpoint_to_resume, tensorboard_writer, train_from

# No LoRA dropout: the answers are sampled without it, so the update scores the policy that sampled them.
RL_DEFAULTS = {"train": {"learning_rate": 1e-5, "warmup_steps": 0, "lr_scheduler": "constant", "save_steps": 50,
                         "logging_steps": 1}, "lora": {"dropout": 0.0}}


@dataclasses.dataclass
class Start:
    """What a run starts from: the weights to load, adapters merged into them first, and the adapter
    that trains on (None: a fresh LoRA)."""
    weights: str
    merged: list[str]
    adapter: str | None
    processor: str

    def describe(self) -> str:
        merged = "".join(f" + {a} merged" for a in self.merged)
        return f"{self.weights}{merged}, " + (f"training adapter {self.adapter} on" if self.adapter else "a fresh LoRA")


def rl(cfg: C.RunConfig, callbacks=()):
    """`pigg rl`: GRPO from the configured start; returns the output folder (and the trainer)."""
    C.validate(cfg)
    if cfg.train.vision:
        raise C.ConfigError("pigg rl trains a LoRA on the language model; train.vision is for global full "
                            "fine-tuning (pigg train)")
    use_local_gpu()
    if not is_main():
        with quiet_stdout():
            return _rl(cfg, list(callbacks))
    with tee_output(log_path(cfg.train.log_dir, "rl_grpo")) as log_file:
        print(f"pigg rl: log file {log_file}")
        return _rl(cfg, list(callbacks))


def _rl(cfg, callbacks):
    out = output_folder(cfg)
    resume_from = checkpoint_to_resume(out, cfg.train.resume)
    start = find_start(cfg.rl.start, cfg.model.name_or_path)
    cfg.model.name_or_path = start.weights  # pigg_config.yaml then names the weights the adapter applies to
    print(f"rl: start from {start.describe()} -> {out}")
    print("resolved config:\n  " + C.yaml.safe_dump(C.to_dict(cfg), sort_keys=False).replace("\n", "\n  "))
    samples, _ = load_samples(cfg.data, scored=True)  # every answer is rewarded against its point
    processor = load_processor(start.processor, cfg.model.min_pixels, cfg.model.max_pixels)
    prompts_processor = left_padded(load_processor(start.processor, cfg.model.min_pixels, cfg.model.max_pixels))

    set_seed(cfg.train.seed)
    model = load_start(cfg, start)
    print(format_counts(parameter_counts(model)))
    out.mkdir(parents=True, exist_ok=True)
    if is_main():
        C.save_yaml(cfg, out / "pigg_config.yaml")
    trainer = grpo_trainer(model, prompts_processor, samples, cfg, out, callbacks)
    r, world = cfg.rl, world_size()
    print(f"rl: {world} process(es); a step samples {r.generations} answers to each of {r.prompts_per_step} "
          f"prompt(s), {r.generations * r.prompts_per_step // world} answers on each process")
    train_from(trainer, resume_from)

    trainer.save_model(str(out))
    if is_main():
        shutil.rmtree(out / "ref", ignore_errors=True)  # TRL's frozen copy of the starting adapter (the KL reference)
        save_processor(processor, out)
        write_provenance(out / "provenance.json", base_model=start.weights, merged_first=start.merged,
                         continued_adapter=start.adapter, start=cfg.rl.start, method="grpo",
                         users=format_users(sorted({s.user for s in samples})), prompts=len(samples),
                         optimizer_steps=trainer.state.global_step, rl=dataclasses.asdict(cfg.rl),
                         resumed_from=str(resume_from) if resume_from else None)
        after = "".join(f" (it applies on top of {a}: pigg export --adapter {a} --adapter {out} --out MERGED)"
                        for a in start.merged)
        print(f"saved the GRPO adapter, processor, pigg_config.yaml and provenance.json to {out}{after}")
    return out, trainer


def output_folder(cfg: C.RunConfig) -> Path:
    return Path(cfg.train.output_dir) / "rl_agent_lora"


def find_start(start: str | None, base_model: str) -> Start:
    """Read what `rl.start` names: nothing (the base), a global output or a personalized fold."""
    if start is None:
        return Start(base_model, [], None, base_model)
    from pigg.personalize import describe_global

    folder = Path(start)
    if (folder / "config.json").is_file():  # full weights: a full global output or a full fold
        return Start(str(folder), [], None, str(folder))
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"rl.start {folder}: neither adapter_config.json nor config.json: not a pigg output")
    provenance = folder / "provenance.json"
    global_output = json.loads(provenance.read_text()).get("base") if provenance.is_file() else None
    if global_output:  # a personalized fold: trained on the global model its provenance names
        model, global_adapter, _ = describe_global(global_output)
        merged = [global_adapter] if global_adapter else []
    else:
        (model, _, _), merged = describe_global(str(folder)), []
    processor = str(folder) if (folder / "tokenizer_config.json").is_file() else model  # as pigg eval chooses
    return Start(model, merged, str(folder), processor)


def load_start(cfg: C.RunConfig, start: Start):
    """The starting model with its trainable LoRA on the language model; the vision tower and projector
    stay frozen."""
    model_cfg = dataclasses.replace(cfg.model, name_or_path=start.weights)
    if start.merged:
        model = load_for_inference(model_cfg, start.merged[0], device()).train()
    else:
        model = load_model(model_cfg, device())
    model.config.use_cache = True  # sampling decodes with the KV cache
    if start.adapter is None:
        return prepare_model(model, "lora", cfg.lora)
    from peft import PeftModel

    print(f"rl: the LoRA rank, alpha and layers are {start.adapter}'s; its dropout is set to lora.dropout="
          f"{cfg.lora.dropout}")
    for p in model.parameters():
        p.requires_grad_(False)
    model = PeftModel.from_pretrained(model, start.adapter, is_trainable=True)
    model.peft_config["default"].lora_dropout = cfg.lora.dropout  # TRL's reference copy is built from it
    for name, module in model.named_modules():
        if ".lora_dropout." in f"{name}." and isinstance(module, torch.nn.Dropout):
            module.p = cfg.lora.dropout
    freeze_vision(model)
    assert_no_adapter_in_vision(model)
    return model


def left_padded(processor):
    """The processor as TRL's GRPOTrainer needs it: TRL pads the prompts it samples from on the left and
    tokenizes them again with the processor for the images' token types, which must line up with them
    (left padding, to the longest prompt). A processor that pigg's training saved pads on the right to a
    multiple of 16 (the collator's call stays in its tokenizer.json), which would misplace the images'
    rotary positions or fail on the shapes."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    tokenizer.pad_to_multiple_of = None
    tokenizer.backend_tokenizer.no_padding()
    return processor


def prompt_dataset(samples: list[Sample]):
    """The samples as GRPO prompts: the conversation up to the answer (its image a placeholder), the
    screenshot in `image` (opened only when a row is read) and the ground-truth answer in `truth`."""
    from datasets import Dataset

    rows = []
    for s in samples:
        prompt, truth = prompt_and_truth(s)
        if len(images_of(s)) != 1:
            raise ValueError(f"{s.where}: GRPO prompts need exactly one image, found {len(images_of(s))}")
        R.truth_point(truth, s.where)
        messages = [{"role": m["role"], "content": [{"type": "image"} if c["type"] == "image" else c
                                                    for c in m["content"]]} for m in prompt.messages]
        rows.append({"prompt": messages, "image": images_of(s)[0], "truth": truth, "where": s.where})
    return Dataset.from_list(rows).with_transform(_open_images)


def _open_images(batch: dict) -> dict:
    return {**batch, "image": [open_image(ref) for ref in batch["image"]]}


def answer_text(completion) -> str:
    """A sampled answer's text: TRL passes conversational completions as [{"role", "content"}]."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"]
    return content if isinstance(content, str) else "".join(c.get("text", "") for c in content)


def reward_functions(mode: str):
    """The click and format rewards in TRL's form; the click reward also logs the hit rate and the
    format reward the share of answers in the full format."""
    def click(completions, truth, log_metric=None, **_):
        answers = [answer_text(c) for c in completions]
        if log_metric:
            log_metric("hit_rate", sum(R.is_hit(a, t) for a, t in zip(answers, truth)) / len(answers))
        return [R.click_reward(a, t, mode) for a, t in zip(answers, truth)]

    def format(completions, log_metric=None, **_):
        scores = [R.format_reward(answer_text(c)) for c in completions]
        if log_metric:
            log_metric("format_rate", sum(s == 1.0 for s in scores) / len(scores))
        return scores

    return [click, format]


def grpo_arguments(cfg: C.RunConfig, out: Path):
    try:
        from trl import GRPOConfig
    except ImportError:
        raise ImportError("pigg rl trains with TRL's GRPOTrainer: pip install 'pigg[rl]'") from None

    t, r = cfg.train, cfg.rl
    world = world_size()
    micro = t.batch_size or r.generations  # answers per forward on each process
    answers = r.prompts_per_step * r.generations
    if answers % (micro * world):
        raise C.ConfigError(f"rl: {r.prompts_per_step} prompts x {r.generations} answers per step do not split into "
                            f"micro-batches of {micro} answers on {world} process(es) (train.batch_size)")
    steps = answers // (micro * world)
    on_gpu = device() == "cuda"
    return GRPOConfig(
        output_dir=str(out / "checkpoints"), learning_rate=t.learning_rate, num_train_epochs=t.epochs,
        max_steps=t.max_steps, per_device_train_batch_size=micro, gradient_accumulation_steps=steps,
        steps_per_generation=steps,  # one round of sampling per optimizer step: checkpoints fall between rounds
        warmup_steps=t.warmup_steps, lr_scheduler_type=t.lr_scheduler, weight_decay=t.weight_decay,
        optim=t.optimizer if on_gpu else "adamw_torch", seed=t.seed, data_seed=t.seed,
        bf16=on_gpu and cfg.model.dtype in ("auto", "bfloat16"), use_cpu=not on_gpu,
        gradient_checkpointing=bool(t.gradient_checkpointing),
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps, logging_first_step=True, report_to="none",
        dataloader_num_workers=t.dataloader_workers, remove_unused_columns=False,
        num_generations=r.generations, temperature=r.temperature, top_p=r.top_p,
        max_completion_length=r.max_new_tokens, beta=r.beta, epsilon=r.epsilon,
        scale_rewards="group", loss_type="grpo", reward_weights=[r.click_weight, r.format_weight],
    )


def grpo_trainer(model, processor, samples, cfg: C.RunConfig, out: Path, callbacks=()):
    args = grpo_arguments(cfg, out)  # first: it says how to install TRL when it is missing
    from pigg.grpo import GRPOTrainer

    tensorboard = [TensorBoardCallback(tb_writer=tensorboard_writer(out))] if is_main() else []
    return GRPOTrainer(model=model, reward_funcs=reward_functions(cfg.rl.click_reward), args=args,
                       train_dataset=prompt_dataset(samples), processing_class=processor,
                       callbacks=[*tensorboard, *callbacks], sampler=cfg.rl.sampler,
                       liger=cfg.fast.liger_kernel)


def demo_rl(cfg: C.RunConfig, global_folder: Path, test_users: str, steps: int = 20) -> Path:
    """`pigg demo --rl`: GRPO from the demo's global model on its training users, then the global and the
    GRPO model answer the same held-out users through `evaluate()`, compared in one report."""
    from pigg.evaluate import evaluate, format_metrics
    from pigg.grounding.priors import attach, global_prior
    from pigg.grounding.report import write_report

    cfg = C.from_dict(RL_DEFAULTS, copy.deepcopy(cfg))  # the demo's model, data and logging settings
    cfg.rl, cfg.train.vision = C.RLSettings(), False
    cfg.rl.start, cfg.rl.generations, cfg.rl.prompts_per_step, cfg.rl.max_new_tokens = str(global_folder), 4, 4, 48
    cfg.train.learning_rate, cfg.train.max_steps, cfg.train.batch_size, cfg.train.grad_accum = 1e-4, steps, None, None
    cfg.train.resume = (output_folder(cfg) / "checkpoints").is_dir()
    folder, _ = rl(cfg)
    cfg.data.users = test_users
    samples, sizes = load_samples(cfg.data, scored=True)
    processor = load_processor(str(folder), cfg.model.min_pixels, cfg.model.max_pixels)
    prior = global_prior(cfg, [str(global_folder)])  # fitted on the global model's training users
    runs = []
    for label, adapter in (("global", None), ("global+grpo", str(folder))):
        model = load_for_inference(dataclasses.replace(cfg.model, name_or_path=str(global_folder)), adapter, device())
        run = folder.parent / "rl_demo_eval" / label
        evaluate(model, processor, samples, sizes, run, 16, 48, 1,
                 meta={"label": label, "model": str(global_folder), "adapter": adapter})
        metrics = attach(run, [prior])
        print(f"\ndemo: {label} on held-out users {test_users}\n{format_metrics(metrics)}")
        runs.append(run)
    report = write_report(runs, folder.parent / "rl_demo_eval" / "report.html")
    print(f"demo: GRPO report {report}")
    return folder
