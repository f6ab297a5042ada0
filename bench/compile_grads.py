"""Do `fast.torch_compile`'s compiled decoder layers give the LoRA gradients that eager layers give?

On an H100 the compiled run's LoRA loss fell faster than eager's from step 3 (12.33 vs 12.97), while
full fine-tuning compiled matched eager; the CPU tests (fp32 and bf16 autocast) find no difference.
This takes one micro-batch of 4 synthetic 1080x2400 screenshots and the real 8B architecture with
random weights and pigg's LoRA (dropout 0), and computes the loss and the adapters' gradients as a
training step does (bf16 autocast, adapter inputs left bf16, logits at supervised positions):

  eager        the reference
  eager again  the same again: the run-to-run noise floor (some attention backward kernels are not
               deterministic)
  compiled     after compile_decoder_layers(), once to compile and once measured

twice: with the adapters' B at zero, as at step 1 (A's gradient must then be exactly zero), and with
B drawn at random, as after a few steps. Per adapter it compares gradient norms and the relative
error against eager, and prints the worst layers.

Then the forward after the first update. The first AdamW step moves every entry of B by about the
learning rate (here lr/2 = 5e-5, warm-up) against its gradient's sign. Each adapter's contribution to
its layer's output is then a few 1e-4 of that output, below half a bf16 step; eager PEFT rounds the
base layer's output to bf16 before adding the adapter's, so most of it may round away. Measured twice:

  whole model  the loss change on the same micro-batch that this first step makes (B = -5e-5 times
               the sign of eager's gradient at B = 0): eager, compiled and float32 (the model upcast,
               no autocast)
  one layer    a LoRA gate_proj (4096 -> 12288) on unit-scale bf16 inputs: the share of the exact
               (float32) adapter contribution that the layer's bf16 output keeps, eager and compiled,
               for B entries of 5e-5, 5e-4 and 5e-3

    python bench/compile_grads.py     # writes $OUT/compile_grads.json when OUT is set

Without a GPU it runs on the CPU with the tiny model (the script's test).
"""
import argparse
import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from phone_8b import phone_users_and_8b
from pigg.data.collate import TrainCollator
from pigg.config import DataConfig, LoraSettings, ModelConfig
from pigg.data.samples import load_samples
from pigg.model.loading import load_model, prepare_model
from pigg.data.processor import load_processor
from pigg.offline.tiny import make_config_folder
from pigg.fast import adapter_input_casts
from pigg.fast.compile import compile_decoder_layers
from pigg.model.loading import device
from pigg.trainer import supervised_loss

MICRO_BATCH = 4
FIRST_UPDATE = 5e-5  # |B| after the first AdamW step at lr 1e-4 halved by warm-up (bench/train_throughput.py)


def gradients(model, batch: dict) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(device(), dtype=torch.bfloat16), adapter_input_casts(model, SimpleNamespace(bf16=True), False):
        loss, _ = supervised_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(reference: dict, other: dict) -> dict:
    """Relative error per parameter, the norms' ratio, and exact zeros that are no longer zero."""
    rows = {}
    for name, ref in reference.items():
        got = other[name]
        norm = ref.norm().item()
        rows[name] = dict(rel_err=(got - ref).norm().item() / norm if norm else float(got.norm().item() > 0),
                          norm_ratio=got.norm().item() / norm if norm else None,
                          nonzero_where_ref_zero=int(((ref == 0) & (got != 0)).sum()))
    return rows


def summary(rows: dict) -> dict:
    errors = sorted(r["rel_err"] for r in rows.values())
    ratios = [r["norm_ratio"] for r in rows.values() if r["norm_ratio"] is not None]
    worst = sorted(rows.items(), key=lambda kv: -kv[1]["rel_err"])[:5]
    return dict(median_rel_err=errors[len(errors) // 2], max_rel_err=errors[-1],
                norm_ratio_min=min(ratios) if ratios else None, norm_ratio_max=max(ratios) if ratios else None,
                nonzero_where_eager_zero=sum(r["nonzero_where_ref_zero"] for r in rows.values()),
                worst={name.replace("base_model.model.model.language_model.", ""): round(r["rel_err"], 4)
                       for name, r in worst})


def set_adapters_b(model, case: str, first_step: dict | None = None) -> None:
    """B at zero, at random, or where AdamW's first step takes it: about the learning rate against
    the sign of each entry's gradient (`first_step`: the gradients at B = 0)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" not in name:
                continue
            if case == "B_zero":
                p.zero_()
            elif case == "B_random":
                p.normal_(std=1e-3)
            else:
                p.copy_(-FIRST_UPDATE * torch.sign(first_step[name]))


def kept_share(delta, exact) -> float:
    """How much of the exact adapter contribution a layer's output kept (1: all, 0: none)."""
    return (delta * exact).sum().item() / (exact * exact).sum().item()


def one_layer() -> dict:
    """Share of the adapter's contribution that survives in a bf16 LoRA layer's output."""
    from peft import LoraConfig, get_peft_model
    from peft.helpers import disable_input_dtype_casting

    torch.manual_seed(0)
    hidden, inter, tokens = (4096, 12288, 4096) if device() == "cuda" else (256, 768, 256)
    base = torch.nn.Sequential()
    base.add_module("gate_proj", torch.nn.Linear(hidden, inter, bias=False))
    torch.nn.init.normal_(base.gate_proj.weight, std=0.02)
    settings = LoraSettings()
    model = get_peft_model(base.to(device(), torch.bfloat16),
                           LoraConfig(r=settings.r, lora_alpha=settings.alpha, target_modules=["gate_proj"]))
    layer = model.base_model.model.gate_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(tokens, hidden, device=device(), dtype=torch.bfloat16)
    compiled = torch.compile(layer)
    shares = {}
    for size in (5e-5, 5e-4, 5e-3):
        with torch.no_grad():
            b.copy_(torch.randint(0, 2, b.shape, device=b.device) * 2.0 - 1.0).mul_(size)
            exact = (x.float() @ a.float().T @ b.float().T) * layer.scaling["default"]
        row = {}
        for name, run in (("eager", layer), ("compiled", compiled)):
            with torch.no_grad(), torch.autocast(device(), dtype=torch.bfloat16), disable_input_dtype_casting(model):
                with_adapter = run(x).float()
                layer.enable_adapters(False)  # the same layer without its adapter
                without = run(x).float()
                layer.enable_adapters(True)
            row[name] = round(kept_share(with_adapter - without, exact), 4)
        shares[f"B_{size:g}"] = row
    return shares


def run_eagerly(layers) -> None:
    """Undo `Module.compile()`: the layers' calls go to their eager code again."""
    for layer in layers:
        layer._compiled_call_impl = None


def first_update_losses(model, batch, first_step: dict) -> dict:
    """The loss change of AdamW's first step (B = -5e-5 sign(gradient)) on the same micro-batch:
    compiled, eager and float32, forward only."""
    layers = model.get_base_model().model.language_model.layers

    def change(autocast: bool) -> float:
        losses = []
        for case in ("B_zero", "B_first_update"):
            set_adapters_b(model, case, first_step)
            with torch.no_grad(), torch.autocast(device(), dtype=torch.bfloat16, enabled=autocast), \
                    adapter_input_casts(model, SimpleNamespace(bf16=True), False):
                losses.append(supervised_loss(model, batch)[0].item())
        return losses[1] - losses[0]

    result = dict(compiled=change(True))
    run_eagerly(layers)
    result["eager"] = change(True)
    model.float()  # last: the float32 reference (the adapters are float32 already)
    result["float32"] = change(False)
    return result


def main(argv=None):
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    from pigg.model.architectures import tiny_qwen3_vl_config

    root = Path(tempfile.mkdtemp(prefix="pigg_compile_grads_"))
    model_dir, data_dir = phone_users_and_8b(root, 1, MICRO_BATCH)
    if device() != "cuda":
        model_dir = make_config_folder(root / "tiny", tiny_qwen3_vl_config())
    samples, _ = load_samples(DataConfig(data_root=str(data_dir), users="1"))
    model_cfg = ModelConfig(name_or_path=str(model_dir), random_weights=True)
    processor = load_processor(str(model_dir), model_cfg.min_pixels, model_cfg.max_pixels)
    batch = {k: v.to(device()) for k, v in TrainCollator(processor, 8192)(samples[:MICRO_BATCH]).items()}
    lengths = batch["attention_mask"].sum(1).tolist()

    torch.manual_seed(0)
    model = prepare_model(load_model(model_cfg, device()), "lora", LoraSettings(dropout=0.0))
    model.train()
    record = dict(device=torch.cuda.get_device_name() if device() == "cuda" else "cpu", torch=torch.__version__,
                  micro_batch_lengths=lengths, layers=model.config.text_config.num_hidden_layers, cases={})
    runs = {}
    for case in ("B_zero", "B_random"):
        set_adapters_b(model, case)
        runs[case] = [gradients(model, batch), gradients(model, batch)]
    compile_decoder_layers(model)
    for case in ("B_zero", "B_random"):
        set_adapters_b(model, case)
        gradients(model, batch)  # compiles (or recompiles for this case's variant)
        runs[case].append(gradients(model, batch))
    for case, ((eager_loss, eager), (again_loss, again), (compiled_loss, compiled)) in runs.items():
        record["cases"][case] = dict(
            loss=dict(eager=eager_loss, eager_again=again_loss, compiled=compiled_loss),
            grad_norm=dict(eager=sum(g.norm() ** 2 for g in eager.values()).sqrt().item(),
                           compiled=sum(g.norm() ** 2 for g in compiled.values()).sqrt().item()),
            eager_again_vs_eager=summary(compare(eager, again)), compiled_vs_eager=summary(compare(eager, compiled)))
    record["first_update_loss_change"] = first_update_losses(model, batch, runs["B_zero"][0][1])
    del model
    record["one_layer_kept_share"] = one_layer()
    text = json.dumps(record, indent=1)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "compile_grads.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
