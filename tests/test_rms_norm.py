"""pigg.fast.kernels.rms_norm: RMSNorm's input gradient for frozen weights, against autograd's; on the CPU in
Triton's interpreter, on a GPU (`pytest -m gpu`) as compiled and in place of Liger's backward."""
import pytest
import torch

from pigg.fast.kernels import rms_norm
from pigg.fast.liger import wider_rms_norm_backward

pytest.importorskip("triton")


def forward(x, weight, offset=0.0, eps=1e-6):
    """Liger's llama-mode RMSNorm as torch ops: y = (x * rstd).to(x.dtype) * (weight + offset), and rstd."""
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (x.float() * rstd).to(x.dtype) * (weight + offset), rstd.squeeze(-1)


@pytest.mark.parametrize("rows, n", [(70, 96), (5, 40)])  # rows not a multiple of a tile's; n not a power of 2
def test_the_input_gradient_is_autograds(rows, n):
    if torch.cuda.is_available():
        pytest.skip("compiled on the GPU: test_*_on_gpu")
    torch.manual_seed(0)
    x = torch.randn(rows, n, requires_grad=True)
    weight, dy = torch.randn(n), torch.randn(rows, n)
    y, rstd = forward(x, weight, offset=0.5)
    y.backward(dy)
    torch.testing.assert_close(rms_norm.input_grad(dy, x.detach(), weight, rstd.detach(), 0.5), x.grad)
    in_place = dy.clone()
    assert rms_norm.input_grad(in_place, x.detach(), weight, rstd.detach(), 0.5, out=in_place) is in_place
    torch.testing.assert_close(in_place, x.grad)


def test_inputs_it_cannot_take_are_named():
    with pytest.raises(ValueError, match=r"got x \(4, 8\), dy \(4, 8\), weight \(7,\), rstd \(4,\)"):
        rms_norm.input_grad(torch.ones(4, 8), torch.ones(4, 8), torch.ones(7), torch.ones(4))
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm.input_grad(torch.ones(8, 4).t(), torch.ones(4, 8), torch.ones(8), torch.ones(4))


def test_liger_backward_is_swapped_only_where_it_applies(monkeypatch):
    """On a stand-in for liger_kernel.ops.rms_norm: its backward is swapped inside the block and put back
    after; CPU inputs still go to it; a function with other arguments (another liger-kernel) is left."""
    import sys
    import types

    calls = []

    def stock(dY, X, W, RSTD, offset, casting_mode, BLOCK_SIZE, num_warps, in_place, row_mode, needs_dw=None):
        calls.append(needs_dw)
        return "Liger's"

    liger = types.SimpleNamespace(rms_norm_backward=stock, _str_to_casting_mode={"llama": 0})
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.ops", types.SimpleNamespace(rms_norm=liger))
    x = torch.ones(4, 8)
    with wider_rms_norm_backward() as wider:
        assert wider and liger.rms_norm_backward is not stock
        assert liger.rms_norm_backward(x, x, torch.ones(8), torch.ones(4), 0.0, 0, 8, 4, True, None,
                                       needs_dw=False) == "Liger's" and calls == [False]
    assert liger.rms_norm_backward is stock
    liger.rms_norm_backward = other = lambda dY, X, W, RSTD: None  # noqa: E731
    with wider_rms_norm_backward() as wider:
        assert not wider and liger.rms_norm_backward is other


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8576, 4096), (8576 * 8, 128)])  # the 8B's hidden size, k_norm's heads
def test_liger_rms_norm_takes_the_kernel_for_frozen_weights_on_gpu(shape, monkeypatch):
    """Liger's RMSNorm with a frozen weight gives the same input gradient (within bf16 rounding) through
    `input_grad`; with a trained weight, Liger's own backward and the weight's gradient."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    liger = pytest.importorskip("liger_kernel.ops")
    torch.manual_seed(0)
    x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    calls = []
    monkeypatch.setattr(rms_norm, "input_grad", lambda *a, _f=rms_norm.input_grad, **k: calls.append(1) or _f(*a, **k))

    def grads(weight, wider):
        x_ = x.clone().requires_grad_()
        with wider_rms_norm_backward() if wider else torch.enable_grad():
            liger.LigerRMSNormFunction.apply(x_, weight, 1e-6, 0.0, "llama", True).backward(dy.clone())
        return x_.grad, weight.grad

    with wider_rms_norm_backward() as swapped:
        assert swapped  # the liger-kernel installed has the backward this replaces
    frozen = torch.randn(shape[1], device="cuda", dtype=torch.bfloat16)
    (stock, _), (wider, _) = grads(frozen, False), grads(frozen, True)
    assert calls == [1]
    torch.testing.assert_close(wider, stock, rtol=1.6e-2, atol=1e-2)
    trained = frozen.clone().requires_grad_()
    (_, stock_w), (_, wider_w) = grads(trained, False), grads(trained.detach().requires_grad_(), True)
    assert calls == [1] and wider_w is not None
    torch.testing.assert_close(wider_w, stock_w)
