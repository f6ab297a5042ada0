"""Typed run configuration: dataclasses whose defaults are the seed system's, YAML and CLI on top.

Every field's `help` becomes the CLI help text. `validate()` collects every problem and raises once.
A run writes its resolved configuration next to its weights (`pigg_config.yaml`).
"""
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SEED_MAX_PIXELS = 1280 * 28 * 28
# pigg's learning rate by method: Qwen's advice for full fine-tuning; for LoRA the peers' default and the
# advice in Qwen3-VL's issue tracker (at 1e-6 an adapter barely moves in an epoch). The seed's scripts pass 1e-6.
LEARNING_RATES = {"lora": 1e-4, "full": 1e-6}
LLM_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def opt(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    name_or_path: str = opt("Qwen/Qwen3-VL-8B-Instruct", "Hub id or local folder of the base model and processor.")
    dtype: str = opt("auto", "Weights dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, float32.")
    attn_implementation: str = opt("sdpa", "Attention kernel: sdpa, eager, flash_attention_2.")
    min_pixels: int | None = opt(None, "Smallest image area in pixels after resizing (None: the processor's).")
    max_pixels: int = opt(SEED_MAX_PIXELS, "Largest image area in pixels after resizing (seed: 1280*28*28).")
    random_weights: bool = opt(False, "Build the architecture from the folder's config.json with random weights "
                                      "(benchmarks and tests only).", hidden=True)


@dataclass
class LoraSettings:
    r: int = opt(8, "LoRA rank.")
    alpha: int = opt(32, "LoRA alpha (scale = alpha / r).")
    dropout: float = opt(0.1, "Dropout on the LoRA input.")
    bias: str = opt("none", "Which biases to train: none, all, lora_only.")
    target_modules: list[str] = opt(LLM_LINEARS, "Linear layers of the language model that get adapters.")


@dataclass
class DataConfig:
    data_root: str = opt("data", "Folder with one user_{id}.pkl (or .jsonl) per user.")
    image_root: str | None = opt(None, "Folder that relative image paths resolve against (default: data_root).")
    users: str = opt("11-83", "Users to train on: '11-83', '1,3,5-7'.")
    skip_missing_users: bool = opt(False, "Skip users in the range that have no file (listed loudly) instead of failing.")
    trust_pickle: bool = opt(False, "Load pickles with the full unpickler (only for files you trust: it can run code).")
    allow_unparseable_answers: bool = opt(False, "Train on samples whose answer holds no point evaluation can read "
                                                 "(listed as a warning); eval and personalize always refuse them.")
    max_length: int = opt(8192, "Longest sample in tokens (image tokens included); longer samples are an error.")
    validation_workers: int = opt(8, "Processes that decode images during validation.")


@dataclass
class TrainConfig:
    method: str = opt("lora", "lora or full (the whole language model; vision and projector stay frozen).")
    vision: bool = opt(False, "With full fine-tuning, also train the vision tower and its projector (Qwen's "
                              "tune_mm_vision and tune_mm_mlp). The demo's random tiny model needs it; the batch "
                              "plan does not count the tower's activations, and the speed switches written for a "
                              "frozen tower are turned off.")
    output_dir: str = opt(".", "Folder that receives global_agent_lora/ or global_agent_full/.")
    learning_rate: float | None = opt(None, "Peak learning rate (None: by method, 1e-4 for LoRA, 1e-6 for full "
                                            "fine-tuning; the seed used 1e-6 for both).")
    epochs: float = opt(1.0, "Passes over the training data.")
    max_steps: int = opt(-1, "Stop after this many optimizer steps (-1: run the epochs).")
    effective_batch: int = opt(8, "Samples per optimizer step over all GPUs (seed: 8); the loss is normalised over "
                                  "their supervised tokens.")
    batch_size: int | None = opt(None, "Samples per GPU per micro-batch (None: the largest the GPU's memory holds; "
                                       "1 on CPU).")
    grad_accum: int | None = opt(None, "Micro-batches per optimizer step (None: effective_batch / (batch_size x GPUs)); "
                                       "if given, the effective batch is batch_size x grad_accum x GPUs.")
    warmup_steps: int = opt(50, "Linear warm-up steps.")
    lr_scheduler: str = opt("linear", "Learning-rate schedule after warm-up (transformers' names).")
    weight_decay: float = opt(0.01, "AdamW weight decay.")
    gradient_checkpointing: bool | None = opt(None, "Recompute activations in the backward pass to save memory: "
                                                    "true on every decoder layer, false on none (None: on as few "
                                                    "layers as the chosen micro-batch needs to fit; off on CPU).")
    gpu_memory_gib: float | None = opt(None, "GiB of the GPU a training process may use (None: all of it); the batch "
                                             "plan is chosen for it and PyTorch's allocator is capped there.")
    save_steps: int = opt(500, "Save a resumable checkpoint every this many optimizer steps.")
    save_total_limit: int = opt(3, "Checkpoints to keep.")
    logging_steps: int = opt(10, "Log loss, learning rate and supervised tokens every this many steps.")
    dataloader_workers: int = opt(8, "Processes that decode images and tokenize (0: in the main process).")
    optimizer: str = opt("adamw_torch_fused", "transformers' optimizer name (AdamW; the fused kernel by default).")
    seed: int = opt(42, "Random seed (data order, dropout, initialisation of adapters).")
    log_dir: str = opt("logs", "Folder for the run's text log.")
    resume: bool = opt(False, "Continue from the newest complete checkpoint in the output folder.")
    distributed: str = opt("auto", "With several processes (--gpus 0,1): ddp (every GPU holds the whole model) or fsdp "
                                   "(FSDP2: weights, gradients and optimizer state sharded over the GPUs); auto: ddp "
                                   "for LoRA, fsdp for full fine-tuning. Ignored with one process.")


@dataclass
class FastConfig:
    """Speed switches. Each keeps the same mathematics as the stock code it replaces (torch_compile aside,
    which is off by default); turn one off to rule it out when something looks wrong. docs/performance.md
    says what each replaces and what it saves."""
    liger_kernel: bool | None = opt(None, "Liger's fused RMSNorm, RoPE and SwiGLU kernels, in training and in "
                                          "generation's prefill (None: on when liger-kernel is installed, on a GPU, "
                                          "torch_compile off; pip install 'pigg[fast]').")
    fused_lora: bool = opt(True, "Apply each LoRA adapter with fewer passes over memory (pigg.fast.lora): the dropout "
                                 "mask is drawn again in the backward instead of keeping the dropped-out input. Off: "
                                 "PEFT's forward. Not with torch_compile nor with lora_input_fp32.")
    lora_kernels: bool = opt(True, "With fused_lora on a GPU: each adapter's dropout and A in Triton kernels "
                                   "(pigg.fast.kernels.lora) that draw the mask inside them, with torch's keep "
                                   "probability. Off: torch's dropout, drawn again in the backward.")
    lora_input_fp32: bool = opt(False, "Cast each adapted layer's input to the adapters' float32 before the LoRA "
                                       "dropout (PEFT's default). Off, it stays bf16 under autocast: the same values "
                                       "after autocast's cast, without two extra copies of every activation.")
    logits_on_labels_only: bool = opt(True, "Compute lm_head and the loss only where a token is supervised (the same "
                                            "loss; the vocabulary-wide logits elsewhere are never used).")
    padding_mask: bool = opt(False, "Give attention the micro-batch's padding mask (the seed's way). Off, rows padded "
                                    "on the right train with causal attention alone, which gives every real token the "
                                    "same result, and SDPA runs its causal kernel.")
    pad_to_multiple: int = opt(16, "Pad each micro-batch to a multiple of this many tokens (1: to its longest row), so "
                                   "attention and Triton kernels are planned for a few lengths instead of most steps; "
                                   "the padding is never supervised.")
    batched_vision_attention: bool = opt(True, "Attend a micro-batch's same-sized images in one SDPA call per vision "
                                               "layer (pigg.fast.vision) instead of image by image; the same attention.")
    vision_without_autocast: bool = opt(True, "Run the frozen vision tower in bf16 outside the Trainer's bf16 "
                                              "autocast: its LayerNorms skip autocast's float32 copies; the same "
                                              "values up to float32 rounding. Off: under autocast, as the seed runs it.")
    cudnn_attention: bool = opt(True, "Let PyTorch's attention (SDPA) use cuDNN's kernels. Off: Flash or the "
                                      "memory-efficient kernel. Turn it off if a run's loss or gradients turn NaN.")
    torch_compile: bool = opt(False, "Compile each decoder layer of the language model with torch.compile (one graph "
                                     "serves all of them; the first steps wait for it). Liger stays off unless asked "
                                     "for; one process only.")


@dataclass
class EvalSettings:
    adapter: str | None = opt(None, "LoRA adapter folder to apply to the model (e.g. OUT/global_agent_lora).")
    checkpoint: str | None = opt(None, "A pigg output or checkpoint folder: an adapter (base from its config) or a full model.")
    out: str | None = opt(None, "Folder for predictions and metrics (default: eval_runs/<label>).")
    label: str | None = opt(None, "Name of this model in reports (default: vanilla, or the checkpoint's folder name).")
    batch_size: int = opt(32, "Prompts per generate() call; prompts are grouped by length and left-padded.")
    max_new_tokens: int = opt(128, "Most tokens generated per answer (the seed used 512; answers are ~30).")
    workers: int = opt(4, "DataLoader processes that decode images and tokenize.")
    fast_generation: bool = opt(True, "Answer through pigg's decoding loop (no padding mask, static cache, decoding "
                                      "step as a CUDA graph); false: transformers' generate(), the same greedy "
                                      "answers the slow way.")
    prior_users: str | None = opt(None, "Training users whose ground-truth points fit the global prior baseline "
                                        "(None: the users recorded in the checkpoint's provenance.json, else the "
                                        "seed's 11-83 when their files exist).")
    prior_data_root: str | None = opt(None, "Folder with the global prior's training users' files (None: the "
                                            "checkpoint's training data_root, else data.data_root).")
    benchmark: str | None = opt(None, "Evaluate on a public benchmark instead of user data: screenspot, screenspot-v2 "
                                      "or screenspot-pro, read from benchmark_root.")
    benchmark_root: str | None = opt(None, "Folder with the benchmark's files as published (screenspot_*.json and "
                                           "its image folder, or annotations/ and images/).")
    prompt: str = opt("pigg", "How a benchmark or `pigg predict` asks the model: pigg (the training data's "
                              "instruction prompt) or qwen (Qwen3-VL's own JSON pointing format). User data "
                              "carries its own prompt.")


@dataclass
class PersonalizeSettings:
    base: str | None = opt(None, "Global fine-tuning output to start from (global_agent_lora/ or global_agent_full/).")
    folds: int = opt(3, "K: each user's samples are split into K folds (seed: 3).")
    fold: int | None = opt(None, "Run only this fold (1..K); None runs them all.")
    split: str = opt("kfold", "kfold: shuffled K-fold, train on K-1 folds, test on 1; time: the samples in file "
                              "order cut into K blocks, fold k trains on blocks before k and tests on block k.")
    split_seed: int = opt(42, "Seed of the K-fold shuffle (seed: 42).")


@dataclass
class RLSettings:
    start: str | None = opt(None, "What GRPO starts from: a global output (global_agent_lora/ or global_agent_full/), a "
                                  "personalized fold (personal_agent_lora/user_N/fold_K/) or None: model.name_or_path.")
    generations: int = opt(8, "G: answers sampled for each prompt; their rewards are compared within the group.")
    prompts_per_step: int = opt(4, "Prompts (each with its G answers) per optimizer step over all processes.")
    temperature: float = opt(1.0, "Sampling temperature of the answers.")
    top_p: float = opt(1.0, "Nucleus sampling: keep the smallest set of tokens with this much probability.")
    max_new_tokens: int = opt(128, "Most tokens per sampled answer.")
    click_reward: str = opt("hit", "hit: 1 within 140 units of the true point in 0-1000 space, else 0; distance: "
                                   "1 - d / 280, floored at 0 (pigg.grounding.rewards).")
    click_weight: float = opt(1.0, "Weight of the click reward in the total reward.")
    format_weight: float = opt(0.5, "Weight of the format reward (closed referring block, grounding block with a point).")
    beta: float = opt(0.04, "Weight of the KL penalty to the starting model (0: none, and no reference pass).")
    epsilon: float = opt(0.2, "Clip range of the policy ratio.")
    sampler: str = opt("pigg", "What samples the answers: pigg (pigg's generator: each prompt prefilled once for its "
                               "group, a static cache, CUDA graphs) or transformers (TRL's generate()).")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)
    personalize: PersonalizeSettings = field(default_factory=PersonalizeSettings)
    fast: FastConfig = field(default_factory=FastConfig)
    rl: RLSettings = field(default_factory=RLSettings)


SECTIONS = {"model": ModelConfig, "lora": LoraSettings, "data": DataConfig, "train": TrainConfig,
            "eval": EvalSettings, "personalize": PersonalizeSettings, "fast": FastConfig,
            "rl": RLSettings}
# Older runs wrote the speed switches under `train`; their pigg_config.yaml still loads.
MOVED_TO_FAST = {f.name for f in dataclasses.fields(FastConfig)}


class ConfigError(ValueError):
    pass


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, base: RunConfig | None = None, source: str = "config") -> RunConfig:
    """Overlay a nested dict ({section: {field: value}}) on `base`; unknown keys are errors."""
    cfg = base or RunConfig()
    problems = []
    for section, values in (data or {}).items():
        if section not in SECTIONS:
            problems.append(f"{source}: unknown section '{section}' (known: {', '.join(SECTIONS)})")
            continue
        kinds = {f.name: str(f.type) for f in dataclasses.fields(SECTIONS[section])}
        for key, value in (values or {}).items():
            if section == "train" and key in MOVED_TO_FAST:
                section_of_key, kind = "fast", str(next(f.type for f in dataclasses.fields(FastConfig) if f.name == key))
            elif key not in kinds:
                problems.append(f"{source}: unknown field '{section}.{key}'")
                continue
            else:
                section_of_key, kind = section, kinds[key]
            if "float" in kind and isinstance(value, str):
                # YAML 1.1 reads 1e-4 (no dot) as a string; a float field takes it as the number it spells
                try:
                    value = float(value)
                except ValueError:
                    problems.append(f"{source}: {section}.{key} must be a number, got {value!r}")
                    continue
            setattr(getattr(cfg, section_of_key), key, value)
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


def load_yaml(path, base: RunConfig | None = None) -> RunConfig:
    with open(path) as f:
        return from_dict(yaml.safe_load(f) or {}, base, source=str(path))


def save_yaml(cfg: RunConfig, path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill the settings whose default depends on another one: train.learning_rate on train.method. Every
    run resolves before it prints or saves its configuration, so pigg_config.yaml holds the number."""
    if cfg.train.learning_rate is None and cfg.train.method in LEARNING_RATES:
        cfg.train.learning_rate = LEARNING_RATES[cfg.train.method]
    return cfg


def validate(cfg: RunConfig) -> RunConfig:
    """Resolve the method-dependent defaults, then check every field; raise one ConfigError listing all
    problems."""
    resolve(cfg)
    p = []
    t, d, m, lo = cfg.train, cfg.data, cfg.model, cfg.lora
    if t.method not in ("lora", "full"):
        p.append(f"train.method must be 'lora' or 'full', got {t.method!r}")
    if t.vision and t.method != "full":
        p.append("train.vision trains the vision tower with full fine-tuning only (train.method full)")
    if cfg.fast.pad_to_multiple < 1:
        p.append(f"fast.pad_to_multiple must be >= 1, got {cfg.fast.pad_to_multiple}")
    for name in ("effective_batch", "batch_size", "grad_accum", "save_steps", "save_total_limit", "logging_steps"):
        if getattr(t, name) is not None and getattr(t, name) < 1:
            p.append(f"train.{name} must be >= 1, got {getattr(t, name)}")
    if t.learning_rate is not None and not t.learning_rate > 0:
        p.append(f"train.learning_rate must be > 0, got {t.learning_rate}")
    if t.epochs <= 0 and t.max_steps <= 0:
        p.append("train.epochs must be > 0 unless train.max_steps is set")
    if t.gpu_memory_gib is not None and not t.gpu_memory_gib > 0:
        p.append(f"train.gpu_memory_gib must be > 0, got {t.gpu_memory_gib}")
    if t.warmup_steps < 0 or t.weight_decay < 0 or t.dataloader_workers < 0:
        p.append("train.warmup_steps, train.weight_decay and train.dataloader_workers must be >= 0")
    if t.distributed not in ("auto", "ddp", "fsdp"):
        p.append(f"train.distributed must be auto, ddp or fsdp, got {t.distributed!r}")
    if m.dtype not in ("auto", "bfloat16", "float32", "float16"):
        p.append(f"model.dtype must be auto, bfloat16, float16 or float32, got {m.dtype!r}")
    if m.max_pixels < 32 * 32 or (m.min_pixels is not None and m.min_pixels > m.max_pixels):
        p.append(f"model.max_pixels ({m.max_pixels}) must be >= 1024 and >= model.min_pixels ({m.min_pixels})")
    if lo.r < 1 or lo.alpha <= 0 or not 0 <= lo.dropout < 1:
        p.append(f"lora: need r >= 1, alpha > 0, 0 <= dropout < 1 (got r={lo.r}, alpha={lo.alpha}, dropout={lo.dropout})")
    bad = sorted(set(lo.target_modules) - set(LLM_LINEARS))
    if bad or not lo.target_modules:
        p.append(f"lora.target_modules must be a non-empty subset of {LLM_LINEARS}, got extra {bad}")
    if lo.bias not in ("none", "all", "lora_only"):
        p.append(f"lora.bias must be none, all or lora_only, got {lo.bias!r}")
    if cfg.eval.batch_size < 1 or cfg.eval.max_new_tokens < 1 or cfg.eval.workers < 0:
        p.append("eval.batch_size and eval.max_new_tokens must be >= 1, eval.workers >= 0")
    ps = cfg.personalize
    if ps.folds < 2 or ps.split not in ("kfold", "time") or (ps.fold is not None and not 1 <= ps.fold <= ps.folds):
        p.append(f"personalize: need folds >= 2, split kfold or time, 1 <= fold <= folds "
                 f"(got folds={ps.folds}, split={ps.split!r}, fold={ps.fold})")
    if ps.split == "time" and ps.fold == 1:
        p.append("personalize.fold: the time split has no fold 1 (nothing comes before the first block)")
    p += rl_problems(cfg.rl)
    if d.max_length < 64:
        p.append(f"data.max_length must be >= 64, got {d.max_length}")
    try:
        from pigg.data.users import parse_users

        parse_users(d.users)
    except ValueError as e:
        p.append(f"data.users: {e}")
    if p:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(p))
    return cfg


def rl_problems(r: RLSettings) -> list[str]:
    p = []
    if r.generations < 2 or r.prompts_per_step < 1 or r.max_new_tokens < 1:
        p.append(f"rl: need generations >= 2, prompts_per_step >= 1, max_new_tokens >= 1 (got {r.generations}, "
                 f"{r.prompts_per_step}, {r.max_new_tokens})")
    if r.click_reward not in ("hit", "distance"):
        p.append(f"rl.click_reward must be hit or distance, got {r.click_reward!r}")
    if r.sampler not in ("pigg", "transformers"):
        p.append(f"rl.sampler must be pigg or transformers, got {r.sampler!r}")
    if r.temperature <= 0 or not 0 < r.top_p <= 1 or r.beta < 0 or r.epsilon <= 0:
        p.append(f"rl: need temperature > 0, 0 < top_p <= 1, beta >= 0, epsilon > 0 (got {r.temperature}, "
                 f"{r.top_p}, {r.beta}, {r.epsilon})")
    return p


def output_folder(cfg: RunConfig) -> Path:
    return Path(cfg.train.output_dir) / f"global_agent_{cfg.train.method}"
