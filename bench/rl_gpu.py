"""GRPO (`pigg rl`) on one GPU with the real Qwen3-VL-8B architecture (random weights) and 1080x2400
phone screenshots: prompts per second, the time split between sampling the answers and the policy
update, and peak memory.

Each sampler given (`rl.sampler`: pigg's generator, TRL's generate()) runs the same steps on the same
model in turn, side by side. Random weights answer with junk, so every answer runs to --max-new-tokens
(min_new_tokens is not set: a random model rarely emits <|im_end|>): the sampling time is the upper bound
for that limit. Step times are taken from the second optimizer step on (the first pays for warm-up).

    python bench/rl_gpu.py [--steps 4] [--generations 8] [--prompts-per-step 4] [--max-new-tokens 64]
                           [--beta 0.04] [--batch-size N] [--samplers pigg,transformers]
                           [--json NAME]   # written as $OUT/NAME (rl_gpu.json) when OUT is set
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps to run (the first is warm-up)")
    parser.add_argument("--generations", type=int, default=8, help="G: answers sampled per prompt")
    parser.add_argument("--prompts-per-step", type=int, default=4, help="prompts per optimizer step")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per sampled answer")
    parser.add_argument("--beta", type=float, default=0.04, help="KL weight (0 skips the reference pass)")
    parser.add_argument("--batch-size", type=int, default=None, help="answers per forward (default: G)")
    parser.add_argument("--samples", type=int, default=16, help="synthetic prompts to draw from")
    parser.add_argument("--samplers", default="pigg,transformers",
                        help="rl.sampler values to run one after the other (comma-separated)")
    parser.add_argument("--json", default="rl_gpu.json", help="file name under $OUT for the results")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is warm-up)")
    args.samplers = args.samplers.split(",")
    if not args.samplers or not set(args.samplers) <= {"pigg", "transformers"}:
        parser.error(f"--samplers: pigg and/or transformers, got {','.join(args.samplers)}")
    return args


class StepClock:
    """Wall time of each optimizer step and of the sampling inside it, the GPU synchronised at each edge."""

    def __init__(self, trainer):
        import torch

        self.sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        self.steps, self.sampling = [], []
        self._wrap(trainer, "_generate", self.sampling)
        self._wrap(trainer, "training_step", self.steps)

    def _wrap(self, trainer, name, into):
        original = getattr(trainer, name)

        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            result = original(*args, **kwargs)
            self.sync()
            into.append(time.perf_counter() - start)
            return result

        setattr(trainer, name, timed)


def main(argv=None):
    args = parse_args(argv)
    import torch

    from phone_8b import phone_users_and_8b
    from pigg import config as C
    from pigg.data.processor import load_processor
    from pigg.data.samples import load_samples
    from pigg.rl import RL_DEFAULTS, find_start, grpo_trainer, left_padded, load_start

    print("device:", torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    root = Path(tempfile.mkdtemp(prefix="pigg_rl_"))
    model_dir, data_dir = phone_users_and_8b(root, 1, args.samples)
    cfg = C.from_dict(RL_DEFAULTS, C.RunConfig())
    cfg.model.name_or_path, cfg.model.random_weights = str(model_dir), True
    cfg.data.data_root, cfg.data.users = str(data_dir), "1"
    t, r = cfg.train, cfg.rl
    t.output_dir, t.log_dir, t.max_steps, t.save_steps, t.batch_size = str(root), str(root / "logs"), args.steps, 10**6, \
        args.batch_size
    r.generations, r.prompts_per_step, r.max_new_tokens, r.beta = (args.generations, args.prompts_per_step,
                                                                   args.max_new_tokens, args.beta)
    C.validate(cfg)
    samples, _ = load_samples(cfg.data, scored=True)
    processor = left_padded(load_processor(str(model_dir), cfg.model.min_pixels, cfg.model.max_pixels))
    model = load_start(cfg, find_start(None, str(model_dir)))
    runs = []
    for sampler in args.samplers:  # the same model: the adapter the run before trained only changes its answers
        r.sampler = sampler
        runs.append(timed_run(grpo_trainer(model, processor, samples, cfg, root / f"rl_{sampler}"), args, sampler))
        drop_reference(model)
        torch.cuda.empty_cache()
    result = dict(device=torch.cuda.get_device_name(), generations=args.generations,
                  prompts_per_step=args.prompts_per_step, max_new_tokens=args.max_new_tokens, beta=args.beta,
                  runs=runs)
    print(f"{'sampler':>12} {'prompts/s':>10} {'step s':>8} {'sampling s':>11} {'update s':>9} {'answer len':>11} "
          f"{'peak GiB':>9}")
    for run in runs:
        print(f"{run['sampler']:>12} {run['prompts_per_second']:>10} {run['step_seconds']:>8} "
              f"{run['sampling_seconds']:>11} {run['update_and_scoring_seconds']:>9} {run['answer_length']:>11} "
              f"{run['peak_gib']:>9}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


def drop_reference(model) -> None:
    """Remove the frozen copy of the starting adapter that TRL added as the KL reference, so that the
    next trainer on this model can add its own."""
    if "ref" in model.peft_config:
        model.delete_adapter("ref")
        model.set_adapter("default")


def timed_run(trainer, args, sampler: str) -> dict:
    """Train for --steps optimizer steps; the mean step (after the first) and its sampling, peak memory."""
    import torch

    clock = StepClock(trainer)
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    # one optimizer step = gradient_accumulation_steps training_step calls, the first of which samples
    per_step = trainer.args.gradient_accumulation_steps
    steps = [sum(clock.steps[i:i + per_step]) for i in range(0, len(clock.steps), per_step)][1:]
    sampling = clock.sampling[1:]
    step_s, sampling_s = sum(steps) / len(steps), sum(sampling) / len(sampling)
    lengths = [log["completions/mean_length"] for log in trainer.state.log_history if "completions/mean_length" in log]
    return dict(sampler=sampler, answers_per_forward=trainer.args.per_device_train_batch_size, timed_steps=len(steps),
                step_seconds=round(step_s, 2), prompts_per_second=round(args.prompts_per_step / step_s, 3),
                sampling_seconds=round(sampling_s, 2), update_and_scoring_seconds=round(step_s - sampling_s, 2),
                sampling_share=round(sampling_s / step_s, 3),
                answer_length=round(sum(lengths) / len(lengths), 1) if lengths else None,
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1))


if __name__ == "__main__":
    main()
