"""GPU-only checks, run on the device machine with `pytest -m gpu`."""
import pytest
import torch

from conftest import losses, tiny_run_config
from test_lora import assert_as_close_to_float32_as_peft, bf16_runs, relative_error

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def test_stock_processor_loads_the_saved_folder(tiny_dir):
    from transformers import AutoProcessor, Qwen3VLProcessor

    from pigg.processor import has_torchvision, load_processor

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

    from pigg.train import liger_kernels

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


def test_batched_vision_attention_within_bf16_rounding_on_gpu(tiny_dir, processor, monkeypatch):
    """pigg.vision's batched calls on CUDA's kernels: the stock features within bf16 rounding."""
    from test_vision import stock_and_batched

    ((stock, _), (batched, calls)), layers = stock_and_batched(tiny_dir, processor, monkeypatch, "cuda", torch.bfloat16)
    assert calls == [3, 1, 1] * layers
    for a, b in zip(batched, stock, strict=True):
        torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("m, k, rank, p", [(1000, 4096, 8, 0.1), (77, 200, 16, 0.3), (8448, 12288, 8, 0.1)])
def test_dropout_kernel_is_dropout_with_its_masks_on_gpu(m, k, rank, p):
    """pigg.dropout_kernel's output and gradients are dropout's with the masks it draws, within bf16
    rounding, where tiles are partial too; the masks keep 1 - p of the elements, repeat for the same
    call and differ between calls."""
    import torch.nn.functional as F

    from pigg import dropout_kernel as D

    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(rank, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    grad = torch.randn(m, rank, device="cuda", dtype=torch.bfloat16)
    seed, call = D.reserve_call(x.device)
    keep = D.keep_mask(m, k, p, seed, call, x.device)
    assert abs(keep.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / keep.numel()) ** 0.5 + 1e-4
    assert torch.equal(keep, D.keep_mask(m, k, p, seed, call, x.device))
    assert (keep != D.keep_mask(m, k, p, seed, D.reserve_call(x.device)[1], x.device)).float().mean() > p

    x32, w32 = x.float().requires_grad_(), weight.float().requires_grad_()
    reference = F.linear(torch.where(keep, x32 / (1 - p), 0.0), w32)
    reference.backward(grad.float())
    out = D.dropout_linear(x, weight, p, seed, call)
    grad_x, grad_weight = D.dropout_linear_backward(x, weight, grad, p, seed, call, input_grad=True)
    for got, want in ((out, reference), (grad_x, x32.grad), (grad_weight, w32.grad)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=1e-2 * want.abs().max().item())
    assert D.dropout_linear_backward(x, weight, grad, p, seed, call, input_grad=False)[0] is None


def test_dropout_kernel_trains_the_tiny_model_on_gpu(tiny_dir):
    """In the fused adapters: with B = 0 (a new adapter) the loss is PEFT's to the bit whatever the masks;
    the same seed gives the same gradients; a recomputed layer draws its forward's masks again."""
    from peft.helpers import disable_input_dtype_casting
    from transformers import Qwen3VLForConditionalGeneration

    from pigg.config import LoraSettings
    from pigg.lora import adapted_layers, fused_adapters
    from pigg.model import prepare_model
    from pigg.train import checkpoint_layers, unwrapped

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.bfloat16).cuda()
    model = prepare_model(model, "lora", LoraSettings(dropout=0.1)).train()
    ids = torch.randint(0, 1000, (4, 256), generator=torch.Generator().manual_seed(0)).cuda()

    def step(fused, kernel):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with (fused_adapters(model, fused, kernel), disable_input_dtype_casting(model),
              torch.autocast("cuda", dtype=torch.bfloat16)):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    assert step(True, True)[0] == step(False, False)[0]
    torch.manual_seed(1)
    for layer in adapted_layers(model):
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    loss, grads = step(True, True)
    again, other = step(True, False), step(True, True)
    checkpoint_layers(model, len(unwrapped(model).model.language_model.layers))
    recomputed_loss, recomputed = step(True, True)
    assert other[0] == loss and recomputed_loss == loss
    for name, grad in grads.items():
        assert relative_error(other[1], grads, name) < 1e-2, name
        assert relative_error(recomputed, grads, name) < 1e-2, name
    # the kernel's masks are not PyTorch's: the gradients show it
    assert max(relative_error(again[1], grads, n) for n in grads if "lora_A" in n) > 0.1
