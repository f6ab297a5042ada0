"""pigg.fast.kernels.lora: the mask they draw, and the adapter's function and gradients with it. On the CPU
the kernels run in Triton's interpreter; on a GPU (`pytest -m gpu`) as compiled."""
import functools

import pytest
import torch
import torch.nn.functional as F

from pigg.fast import kernels

from pigg.fast.kernels import lora as lora_kernels
from pigg.fast.lora import AdaptedLinears, adapted_layers
from test_lora import loss_and_gradients

triton = pytest.importorskip("triton")


@pytest.fixture()
def device():
    """The device the kernels run on here: the CPU through Triton's interpreter (set by conftest)."""
    if torch.cuda.is_available():
        pytest.skip("compiled kernels are tested on the GPU (test_*_on_gpu)")
    return "cpu"


def kept(n, k, p, seed, offset, device="cpu", **blocks) -> torch.Tensor:
    """The mask as the backward applies it: the gradient for x of dropout(x) @ A^T with A and the
    gradient of the output all ones, scaled by 1 - p, is 1 where an element is kept and 0 elsewhere
    (exact in bf16, which the compiled kernels take)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ones = torch.ones(n, k, device=device, dtype=dtype)
    grad_x = torch.zeros(n, k, device=device, dtype=dtype)
    lora_kernels.dropout_a_backward(ones, torch.ones(n, 1, device=device, dtype=dtype), torch.ones(1, k, device=device),
                                    p, 1 - p, seed, offset, grad_x=grad_x, **blocks)
    return grad_x.float()


def test_the_mask_keeps_1_minus_p_and_depends_on_seed_offset_and_element_only(device):
    n, k, p = 192, 256, 0.1
    mask = kept(n, k, p, 7, 64)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert abs(mask.mean().item() - (1 - p)) < 0.006  # 49,152 draws: the standard deviation is 0.0014
    # neighbours (in a row, in a column) are dropped independently: both about p * p of the time
    for first, second in ((mask[:, 0::4], mask[:, 1::4]), (mask[0::4], mask[1::4])):
        assert abs(((first == 0) & (second == 0)).float().mean().item() - p * p) < 0.005
    # the tiles the kernels read do not matter: forward's tiles equal the backward's
    assert torch.equal(mask, kept(n, k, p, 7, 64, block_n=16, block_k=32, splits=3))
    ones = torch.ones(n, k)
    forward = lora_kernels.dropout_a(ones, torch.eye(k)[:32], p, 7, 64, block_n=64, block_k=64) * (1 - p)
    assert torch.equal(forward, mask[:, :32])
    # another counter or seed, another mask; the counters of x's elements follow each other, each one
    # giving 8 elements (the offset counts 4 a counter, as torch's does)
    assert not torch.equal(mask, kept(n, k, p, 7, 64 + n * k))
    assert not torch.equal(mask, kept(n, k, p, 8, 64))
    assert torch.equal(kept(n // 2, k, p, 7, 64 + 4 * lora_kernels.counters(n // 2, k)), mask[n // 2:])
    assert kept(n, k, 0.0, 7, 64).eq(1).all()


def reference(x, weight, bias, a, b, p, scale, mask):
    """PEFT's adapter with a given mask, in float32: base(x) + scale * B(A(x * mask / (1 - p)))."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x * mask / (1 - p), a), b)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_adapted_linear_with_kernels_gives_the_adapter_with_their_mask(device, monkeypatch, p):
    monkeypatch.setattr(kernels, "INTERPRET_ON_CPU", True)
    torch.manual_seed(0)
    n, k, out, r, scale = 46, 64, 40, 8, 4.0  # rows not a multiple of the kernels' tiles
    x = torch.randn(n, k, requires_grad=True)
    weight, bias = torch.randn(out, k) / 8, torch.randn(out)
    a, b = (torch.randn(r, k) / 8).requires_grad_(), (torch.randn(out, r) / 8).requires_grad_()
    before = torch.get_rng_state()
    y, = AdaptedLinears.apply(x, p, scale, True, weight, bias, a, b)
    after = torch.get_rng_state()
    torch.set_rng_state(before)
    seed, offset = lora_kernels.draw(x) if p > 0 else (0, 0)  # what the forward drew from this state
    assert torch.equal(torch.get_rng_state(), after)  # and moved the generator on as far (p = 0: not at all)
    mask = kept(n, k, p, seed, offset)
    grad = torch.randn(n, out)
    y.backward(grad)
    x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, b))
    expected = reference(x2, weight, bias, a2, b2, p, scale, mask)
    expected.backward(grad)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    for got, want in ((x.grad, x2.grad), (a.grad, a2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_recomputed_forward_draws_the_same_mask(device, monkeypatch):
    """Activation checkpointing restores the generator before the recomputation, so the recomputed
    forward and the backward use the forward's mask: the gradients equal those without recomputation."""
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setattr(kernels, "INTERPRET_ON_CPU", True)
    torch.manual_seed(0)
    x, weight = torch.randn(32, 64), torch.randn(16, 64)
    a, b = torch.randn(8, 64).requires_grad_(), torch.randn(16, 8).requires_grad_()

    def run(recompute):
        torch.manual_seed(3)
        x_ = x.clone().requires_grad_()
        f = lambda t: AdaptedLinears.apply(t, 0.5, 2.0, True, weight, None, a, b)[0].square().sum()  # noqa: E731
        (checkpoint(f, x_, use_reentrant=False) if recompute else f(x_)).backward()
        grads = x_.grad, a.grad.clone(), b.grad.clone()
        a.grad = b.grad = None
        return grads

    for got, want in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, want)


def count_calls(monkeypatch, *names) -> list:
    """The names of the pigg.fast.kernels.lora functions called from now on, in order, each as often as the
    call's adapters (`adapters`: one unless given)."""
    calls = []

    def counted(*args, _f, _n, **kwargs):
        calls.extend([_n] * kwargs.get("adapters", 1))
        return _f(*args, **kwargs)

    for name in names:
        monkeypatch.setattr(lora_kernels, name, functools.partial(counted, _f=getattr(lora_kernels, name), _n=name))
    return calls


def test_the_tiny_model_with_kernels_gives_pefts_loss_and_gradients_without_dropout(device, monkeypatch, lora_model):
    """Through `fused_adapters(..., kernels=True)` every adapted layer of the tiny model runs the kernels
    forward and backward and `add_b` (a call for q, k and v counts three); without dropout (no masks
    to differ) the loss and gradients are PEFT's."""
    monkeypatch.setattr(kernels, "INTERPRET_ON_CPU", True)
    layers = adapted_layers(lora_model)
    for layer in layers:
        layer.lora_dropout["default"].p = 0.0
    calls = count_calls(monkeypatch, "dropout_a", "dropout_a_backward", "add_b")
    peft_loss, peft_grads, _ = loss_and_gradients(lora_model, fused=False)
    loss, grads, _ = loss_and_gradients(lora_model, fused=True, kernels=True)
    assert calls.count("dropout_a") == len(layers) and calls.count("dropout_a_backward") == len(layers)
    assert calls.count("add_b") == len(layers)
    torch.testing.assert_close(loss, peft_loss)
    assert grads.keys() == peft_grads.keys() and any("lora_A" in n for n in grads)
    for name, grad in peft_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def check_group(device: str, dtype: torch.dtype, n: int = 40, k: int = 64, **tolerance) -> None:
    """q, k and v in one call: adapter i's hidden columns, A's gradient and mask are those of a call of
    its own at the counters after the adapters before it; x's gradients are summed into one grad_x."""
    torch.manual_seed(0)
    r, p, scale, seed, offset = 8, 0.25, 2.0, 7, 64
    x, a = torch.randn(n, k, device=device, dtype=dtype), torch.randn(3 * r, k, device=device, dtype=dtype) / 8
    grad_hidden, grad_x = torch.randn(n, 3 * r, device=device, dtype=dtype), torch.randn(n, k, device=device)
    alone_x = grad_x.clone()  # float32: the three adapters' sums rounded once, as the group rounds them
    grad_x = grad_x.to(dtype)
    hidden = lora_kernels.dropout_a(x, a, p, seed, offset, adapters=3)
    grad_a = lora_kernels.dropout_a_backward(x, grad_hidden, a, p, scale, seed, offset, grad_x=grad_x, adapters=3)
    for i in range(3):
        ranks, at = slice(i * r, (i + 1) * r), offset + 4 * i * lora_kernels.counters(n, k)
        a_i, grad_hidden_i = a[ranks].contiguous(), grad_hidden[:, ranks].contiguous()
        torch.testing.assert_close(hidden[:, ranks], lora_kernels.dropout_a(x, a_i, p, seed, at), **tolerance)
        alone = lora_kernels.dropout_a_backward(x, grad_hidden_i, a_i, p, scale, seed, at, grad_x=alone_x)
        torch.testing.assert_close(grad_a[ranks], alone, **tolerance)
    torch.testing.assert_close(grad_x.float(), alone_x, **tolerance)
    same_a = lora_kernels.dropout_a(x, a[:r].repeat(3, 1), p, seed, offset, adapters=3)
    assert not torch.allclose(same_a[:, :r], same_a[:, r:2 * r])  # the same A, other masks


def test_a_group_of_adapters_is_each_adapter_at_its_own_counters(device):
    check_group(device, torch.float32)


@pytest.mark.gpu
def test_a_group_of_adapters_is_each_adapter_at_its_own_counters_on_gpu():
    """Compiled, on the 8B's q_proj rows and width in bf16: within a bf16 rounding of x's gradient."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    check_group("cuda", torch.bfloat16, n=8576, k=4096, rtol=1.6e-2, atol=2e-2)


def test_add_b_is_addmm(device):
    torch.manual_seed(0)
    y, b, stacked = torch.randn(70, 150), torch.randn(150, 8), torch.randn(70, 24)
    hidden = stacked[:, 8:16]  # rows strided, as a group's hidden columns are
    expected = y.clone().addmm_(hidden, b.t(), alpha=4.0)
    assert lora_kernels.add_b(y, hidden, b, 4.0) is y
    torch.testing.assert_close(y, expected)
    with pytest.raises(ValueError, match=r"B \(150, 8\)"):
        lora_kernels.add_b(torch.ones(70, 151), hidden, b, 1.0)


def test_inputs_the_kernels_cannot_take_are_named():
    assert not lora_kernels.available(torch.ones(4, 12))  # a width not divisible by 8, or on the CPU
    assert not lora_kernels.available(torch.ones(8, 8).t()[:, :4])
    with pytest.raises(ValueError, match=r"A \(8, 12\)"):
        lora_kernels.dropout_a(torch.ones(4, 16), torch.ones(8, 12), 0.1, 0, 0)
    with pytest.raises(ValueError, match="divisible by 8"):
        lora_kernels.dropout_a(torch.ones(4, 20), torch.ones(8, 20), 0.1, 0, 0)
    with pytest.raises(ValueError, match="1 to 3 adapters of one rank"):
        lora_kernels.dropout_a(torch.ones(4, 16), torch.ones(16, 16), 0.1, 0, 0, adapters=3)
    with pytest.raises(ValueError, match="1 to 3 adapters"):
        lora_kernels.dropout_a_backward(torch.ones(4, 16), torch.ones(4, 32), torch.ones(32, 16), 0.1, 1.0, 0, 0,
                                        adapters=4)


@pytest.mark.gpu
def test_compiled_kernels_give_the_adapter_with_their_mask_on_gpu():
    """On the 8B's q_proj shape in bf16: the mask keeps 1 - p, and the hidden columns and gradients are
    the float32 adapter's with that mask within bf16 rounding."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(0)
    n, k, r, p, scale = 8576, 4096, 8, 0.1, 4.0
    x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(r, k, device="cuda") / 64
    seed, offset = lora_kernels.draw(x)
    mask = kept(n, k, p, seed, offset, device="cuda")
    assert abs(mask.mean().item() - (1 - p)) < 1e-3 and set(mask.unique().tolist()) == {0.0, 1.0}
    dropped = x.float() * mask / (1 - p)
    hidden = lora_kernels.dropout_a(x, a, p, seed, offset)
    torch.testing.assert_close(hidden.float(), dropped @ a.bfloat16().float().t(), rtol=1.6e-2, atol=1e-2)
    grad_hidden = torch.randn(n, r, device="cuda", dtype=torch.bfloat16)
    grad_x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    expected_x = grad_x.float() + scale * (grad_hidden.float() @ a.bfloat16().float()) * mask / (1 - p)
    grad_a = lora_kernels.dropout_a_backward(x, grad_hidden, a, p, scale, seed, offset, grad_x=grad_x)
    expected_a = scale * grad_hidden.float().t() @ dropped
    assert ((grad_a - expected_a).norm() / expected_a.norm()).item() < 1e-3
    torch.testing.assert_close(grad_x.float(), expected_x, rtol=1.6e-2, atol=1e-2)
    with pytest.raises(ValueError, match="bf16 or fp16 inputs on a GPU"):  # not float32's TF32 matmuls
        lora_kernels.dropout_a(x.float(), a, p, seed, offset)


@pytest.mark.slow
def test_training_with_kernels_follows_torchs_dropout(device, monkeypatch, tiny_dir, synth_root, tmp_path):
    """train() with `fast.lora_kernels` (interpreted here): without dropout the loss curve of torch's
    path; with the seed's dropout the same first loss (B starts at zero, so no mask shows in it) and a
    curve that other masks move only a little."""
    from conftest import losses, tiny_run_config
    from pigg.train import train

    monkeypatch.setattr(kernels, "INTERPRET_ON_CPU", True)
    calls = count_calls(monkeypatch, "dropout_a")
    curves = {}
    for dropout in (0.0, 0.1):
        for on in (False, True):
            cfg = tiny_run_config(tiny_dir, synth_root, tmp_path / f"{dropout}_{on}", lora_kernels=on)
            cfg.lora.dropout = dropout
            curves[dropout, on] = losses(train(cfg))
    assert calls and len(curves[0.0, True]) == 4
    assert curves[0.0, True] == pytest.approx(curves[0.0, False], rel=1e-4)
    assert curves[0.1, True][0] == pytest.approx(curves[0.1, False][0], rel=1e-5)
    # 4 steps: 0.1% apart at most here; without dropout the curve ends 0.2% lower
    assert curves[0.1, True] == pytest.approx(curves[0.1, False], rel=5e-3)
