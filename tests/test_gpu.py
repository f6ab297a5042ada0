"""GPU-only checks, run on the device machine with `pytest -m gpu`."""
import pytest
import torch

from conftest import losses, tiny_run_config
from test_lora import assert_as_close_to_float32_as_peft, bf16_runs, relative_error
from test_vision import with_and_without_autocast

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def test_stock_processor_loads_the_saved_folder(tiny_dir):
    from transformers import AutoProcessor, Qwen3VLProcessor

    from pigg.data.processor import has_torchvision, load_processor

    assert has_torchvision()
    assert isinstance(AutoProcessor.from_pretrained(tiny_dir), Qwen3VLProcessor)
    processor = load_processor(str(tiny_dir), max_pixels=1280 * 28 * 28)
    assert processor.image_processor.size["longest_edge"] == 1280 * 28 * 28


def test_tiny_lora_trains_in_bf16_on_gpu(tiny_dir, synth_root, tmp_path):
    import importlib.util

    from safetensors.torch import load_file
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    from pigg.train import train

    rope, mlp = modeling_qwen3_vl.apply_rotary_pos_emb, modeling_qwen3_vl.Qwen3VLTextMLP.forward
    folder = train(tiny_run_config(tiny_dir, synth_root, tmp_path, dataloader_workers=2))
    if importlib.util.find_spec("liger_kernel"):  # used by default where installed
        assert "Liger kernels: RMSNorm, RoPE and SwiGLU" in next((tmp_path / "logs").glob("*.log")).read_text()
    # Liger's process-wide patches are undone
    assert modeling_qwen3_vl.apply_rotary_pos_emb is rope and modeling_qwen3_vl.Qwen3VLTextMLP.forward is mlp
    adapter = load_file(folder / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())


def test_liger_swiglu_matches_the_stock_mlp_on_gpu(tiny_dir):
    """The MLP with Liger's SiLU-and-product kernel: transformers' output and input gradient within
    bf16 rounding."""
    pytest.importorskip("liger_kernel")
    from transformers import Qwen3VLForConditionalGeneration

    from pigg.fast.liger import liger_kernels

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.bfloat16).cuda()
    mlp = model.model.language_model.layers[0].mlp
    x = torch.randn(2, 64, mlp.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    results = []
    for on in (False, True):
        with liger_kernels(model, on):
            out = mlp(x)
            (grad,) = torch.autograd.grad(out.float().square().sum(), x)
        results.append((out, grad))
    (out, grad), (fused_out, fused_grad) = results
    torch.testing.assert_close(fused_out, out, rtol=2e-2, atol=1e-2 * out.abs().max().item())
    torch.testing.assert_close(fused_grad, grad, rtol=2e-2, atol=1e-2 * grad.abs().max().item())


def test_compiled_decoder_layers_train_like_eager_on_gpu(tiny_dir, synth_root, tmp_path):
    """Inductor's Triton kernels under bf16 autocast, with PEFT's adapters and bf16 adapter inputs:
    the same losses as eager within bf16 rounding."""
    from torch._dynamo.utils import counters

    from pigg.train import train

    curves, graphs = [], counters["stats"]["unique_graphs"]
    for compiled in (False, True):
        cfg = tiny_run_config(tiny_dir, synth_root, tmp_path / str(compiled), torch_compile=compiled, batch_size=2,
                              max_steps=2, learning_rate=1e-3, liger_kernel=False)
        cfg.lora.dropout = 0.0
        curves.append(losses(train(cfg)))
    assert counters["stats"]["unique_graphs"] > graphs
    assert len(curves[0]) == 2 and curves[1] == pytest.approx(curves[0], rel=2e-2)


def test_fused_adapters_stay_within_bf16_rounding_on_gpu(tiny_dir):
    """CUDA's dropout kernel draws other masks for float32 than for bf16, so the comparison with float32
    runs without dropout; with it, the masks drawn again in the backward must be the forward's: the
    fused and PEFT's gradients then differ by bf16 rounding (a few %), not by other masks (~100%)."""
    assert_as_close_to_float32_as_peft(bf16_runs(tiny_dir, "cuda", 0.0))
    runs = bf16_runs(tiny_dir, "cuda", 0.1)
    assert torch.equal(runs["peft"][1], runs["fused"][1])
    (_, _, grads), (_, _, fused_grads) = runs["peft"], runs["fused"]
    for name in grads:
        assert relative_error(fused_grads, grads, name) < 0.1, name


def test_fused_adapters_with_kernels_stay_within_bf16_rounding_on_gpu(tiny_dir):
    """pigg.fast.kernels.lora in the tiny model: without dropout, as close to float32 as PEFT's adapters;
    with it, their own masks: the loss stays within a few % of PEFT's (B is small), A's gradients do not
    (other masks)."""
    from pigg.fast.kernels import lora as lora_kernels

    assert lora_kernels.triton is not None
    assert_as_close_to_float32_as_peft(bf16_runs(tiny_dir, "cuda", 0.0, kernels=True))
    runs = bf16_runs(tiny_dir, "cuda", 0.1, kernels=True)
    assert runs["fused"][0] == pytest.approx(runs["peft"][0], rel=2e-2)
    name = next(n for n in runs["peft"][2] if "lora_A" in n)
    assert relative_error(runs["fused"][2], runs["peft"][2], name) > 0.1


def test_batched_vision_attention_within_bf16_rounding_on_gpu(tiny_dir, processor, monkeypatch):
    """pigg.fast.vision's batched calls on CUDA's kernels: the stock features within bf16 rounding."""
    from test_vision import stock_and_batched

    ((stock, _), (batched, calls)), layers = stock_and_batched(tiny_dir, processor, monkeypatch, "cuda", torch.bfloat16)
    assert calls == [3, 1, 1] * layers
    for a, b in zip(batched, stock, strict=True):
        torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1e-2)


def test_vision_without_autocast_skips_float32_layer_norms_on_gpu(tiny_dir, processor):
    """CUDA's autocast runs LayerNorm in float32; outside it the bf16 tower's LayerNorm returns bf16, and
    the features stay within bf16 rounding of autocast's."""
    assert with_and_without_autocast(tiny_dir, processor, "cuda") == [torch.float32, torch.bfloat16]


def test_vision_rotary_skips_float32_copies_on_gpu(monkeypatch):
    """pigg.fast.vision's rotary embedding on bf16 q and k laid out as the fused qkv gives them: without
    gradients its kernel gives the stock function's results (float32 copies in and out); with them,
    Liger's kernel gives its patch's; each within one bf16 rounding and the inputs left as they were."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers.rope import liger_rotary_pos_emb_vision
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    from pigg.fast.vision import _rotary, rotary_takes

    length, heads, head_dim = 3000, 16, 72
    torch.manual_seed(0)
    query, key, _ = torch.randn(length, 3, heads, head_dim, device="cuda", dtype=torch.bfloat16).unbind(1)
    angles = torch.rand(length, head_dim // 2, device="cuda") * 60
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    stock = modeling_qwen3_vl.apply_rotary_pos_emb_vision(query, key, cos, sin)
    liger = liger_rotary_pos_emb_vision(query, key, cos, sin)
    before = query.clone()
    monkeypatch.setattr(modeling_qwen3_vl, "apply_rotary_pos_emb_vision", liger_rotary_pos_emb_vision)
    assert rotary_takes(query, key, cos, sin)
    trained = query.clone().requires_grad_(), key.clone().requires_grad_()
    for got, expected in ((_rotary(query, key, cos, sin), stock), (_rotary(*trained, cos, sin), liger)):
        assert torch.equal(query, before)
        for a, b in zip(got, expected, strict=True):
            assert a.dtype == torch.bfloat16 and a.shape == (length, heads, head_dim)
            torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-5)
            assert (a == b).float().mean() > 0.99
    assert all(t.requires_grad for t in _rotary(*trained, cos, sin))


def test_a_training_step_waits_for_the_gpu_only_to_log_and_save_on_gpu(tiny_dir, synth_root, tmp_path):
    """The CPU never waits for the GPU in a training step: not for the sample count, the copy of the
    batch, a NaN test of the loss, the images' grid or the supervised positions (synchronising calls
    around step 3, recorded by CUDA's sync debug mode, come from none of pigg, the Trainer, accelerate
    or the model, only from logging and saving a checkpoint: torch and safetensors on an H200 with
    transformers 5.17), so the CPU prepares the next step while the GPU runs the last."""
    import warnings

    from transformers import TrainerCallback

    from pigg.train import train

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            torch.cuda.set_sync_debug_mode({2: "warn", 3: "default"}.get(state.global_step, "default"))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_run_config(tiny_dir, synth_root, tmp_path, dataloader_workers=2, logging_steps=10),
              callbacks=[Watch()])
    syncs = {(w.filename, w.lineno) for w in caught if "synchronizing" in str(w.message)}
    assert syncs  # the mode was on: logging's and saving's are seen
    for filename, lineno in sorted(syncs):
        print(f"waits for the GPU at {filename}:{lineno}")  # shown with pytest -s
    for filename, lineno in syncs:
        assert "/pigg/" not in filename and "/accelerate/" not in filename, (filename, lineno)
        assert not filename.endswith(("transformers/trainer.py", "modeling_qwen3_vl.py")), (filename, lineno)
