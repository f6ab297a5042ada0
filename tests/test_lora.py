import pytest
import torch

from pigg.config import LoraSettings
from pigg.fast.lora import adapted_layers, fused_adapters
from pigg.model.loading import prepare_model
from pigg.model.batch_plan import checkpoint_layers


IDS = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))


def loss_and_gradients(model, fused: bool, kernels: bool = False):
    """Loss, gradients and the generator's state after one step from seed 0."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with fused_adapters(model, fused, kernels):
        loss = model(input_ids=IDS, labels=IDS, use_cache=False).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, torch.get_rng_state()


@pytest.mark.parametrize("recomputed", [0, 1])
def test_fused_adapters_give_peft_loss_and_gradients(lora_model, recomputed):
    """Same seed: the same dropout masks (the generator ends in the same state), so the same loss and
    adapter gradients as PEFT's forward, with or without a layer's activations recomputed."""
    if recomputed:
        checkpoint_layers(lora_model, recomputed)
    peft_loss, peft_grads, peft_rng = loss_and_gradients(lora_model, fused=False)
    fused_loss, fused_grads, fused_rng = loss_and_gradients(lora_model, fused=True)
    assert torch.equal(peft_rng, fused_rng)
    torch.testing.assert_close(fused_loss, peft_loss)
    assert peft_grads.keys() == fused_grads.keys() and any("lora_A" in n for n in peft_grads)
    for name, grad in peft_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # another seed draws other masks, and the gradients show it: the test sees the dropout
    torch.manual_seed(5)
    with fused_adapters(lora_model, True):
        lora_model.zero_grad(set_to_none=True)
        lora_model(input_ids=IDS, labels=IDS, use_cache=False).loss.backward()
    name = next(n for n in peft_grads if "lora_A" in n)
    assert not torch.allclose(dict(lora_model.named_parameters())[name].grad, peft_grads[name])


def saved_bytes(model, fused: bool, dropout: float) -> int:
    """Bytes of the distinct storages, parameters aside, the forward keeps for the backward."""
    for layer in adapted_layers(model):
        layer.lora_dropout["default"].p = dropout
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in parameters:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with fused_adapters(model, fused), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=IDS, labels=IDS, use_cache=False)
    return sum(storages.values())


def test_fused_adapters_keep_no_dropped_inputs(lora_model):
    """With dropout, PEFT keeps each adapted layer's dropped-out input and mask; the fused adapters keep
    no more than PEFT does without dropout."""
    peft_with, fused_with = saved_bytes(lora_model, False, 0.1), saved_bytes(lora_model, True, 0.1)
    peft_without = saved_bytes(lora_model, False, 0.0)
    tokens, inputs = IDS.numel(), sum(layer.in_features for layer in adapted_layers(lora_model))
    assert peft_with >= peft_without + tokens * inputs * 4  # a float32 copy per adapted layer, at least
    assert fused_with <= peft_without


def test_peft_forward_outside_the_block_and_for_disabled_adapters(lora_model):
    lora_model.eval()
    with torch.no_grad():
        plain = lora_model(input_ids=IDS).logits
        with fused_adapters(lora_model, True):
            assert all("forward" in vars(layer) for layer in adapted_layers(lora_model))
            torch.testing.assert_close(lora_model(input_ids=IDS).logits, plain)
            with lora_model.disable_adapter():
                base = lora_model(input_ids=IDS).logits
        assert not any("forward" in vars(layer) for layer in adapted_layers(lora_model))
        with lora_model.disable_adapter():
            torch.testing.assert_close(lora_model(input_ids=IDS).logits, base)
    assert not torch.allclose(base, plain)


def node(t: torch.Tensor):
    """The autograd node under t's reshape."""
    return t.grad_fn.next_functions[0][0]


def test_layers_that_take_one_input_are_one_node(lora_model):
    """q, k and v (and gate and up) called in turn on the same x are one node, each output PEFT's;
    called on another x, a layer runs on its own."""
    lora_model.eval()
    named = dict(lora_model.named_modules())
    attention = next(named[n.removesuffix(".q_proj")] for n in named if n.endswith("self_attn.q_proj"))
    mlp = next(named[n.removesuffix(".gate_proj")] for n in named if n.endswith("mlp.gate_proj"))
    x, other = torch.randn(2, 3, attention.q_proj.in_features), torch.randn(3, attention.q_proj.in_features)
    with torch.no_grad():
        expected = [layer(t) for layer, t in ((attention.q_proj, x), (attention.k_proj, x), (attention.v_proj, x),
                                              (attention.k_proj, other), (mlp.gate_proj, x), (mlp.up_proj, x))]
    with fused_adapters(lora_model, True):
        q, k, v, alone = attention.q_proj(x), attention.k_proj(x), attention.v_proj(x), attention.k_proj(other)
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    for got, want in zip((q, k, v, alone, gate, up), expected, strict=True):
        torch.testing.assert_close(got, want)
    assert node(q) is node(k) is node(v) and node(gate) is node(up) and node(q) is not node(gate)
    assert node(alone) is not node(k) and type(node(q)).__name__ == "AdaptedLinearsBackward"


def bf16_runs(tiny_dir, device: str, dropout: float, kernels: bool = False) -> dict:
    """Loss, generator state and gradients of one step as pigg trains (bf16 weights under bf16 autocast,
    float32 adapters, bf16 adapter inputs) with PEFT's and the fused adapters, and of the same model in
    float32 (PEFT's), all from the same weights and seed."""
    from peft.helpers import disable_input_dtype_casting
    from transformers import Qwen3VLForConditionalGeneration

    def model_in(dtype):
        model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.bfloat16).to(device, dtype)
        torch.manual_seed(1)
        model = prepare_model(model, "lora", LoraSettings(dropout=dropout)).train()
        for layer in adapted_layers(model):
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
        return model

    shape = (4, 256) if device == "cuda" else (2, 64)
    ids = torch.randint(0, 1000, shape, generator=torch.Generator().manual_seed(0)).to(device)

    def step(model, fused, autocast):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with (fused_adapters(model, fused, kernels), disable_input_dtype_casting(model),
              torch.autocast(device, dtype=torch.bfloat16, enabled=autocast)):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        rng = torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()
        return loss.item(), rng, {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    bf16 = model_in(torch.bfloat16)
    return {"peft": step(bf16, False, True), "fused": step(bf16, True, True),
            "float32": step(model_in(torch.float32), False, False)}


def relative_error(got: dict, reference: dict, name: str) -> float:
    return ((got[name] - reference[name]).norm() / reference[name].norm()).item()


def assert_as_close_to_float32_as_peft(runs: dict):
    """bf16 rounds differently when B, the scale and the sum are one addmm: the fused adapters' loss and
    gradients must be as close to float32's as PEFT's are."""
    (loss, _, grads), (fused_loss, _, fused_grads), (reference_loss, _, reference) = runs.values()
    assert grads.keys() == fused_grads.keys() == reference.keys() and reference
    assert abs(fused_loss - reference_loss) <= 1.5 * abs(loss - reference_loss) + 1e-3 * reference_loss
    for name in reference:
        assert relative_error(grads, reference, name) < 0.1, name  # the same masks (else this says nothing)
        assert relative_error(fused_grads, reference, name) <= 1.5 * relative_error(grads, reference, name) + 1e-3, name


def test_fused_adapters_stay_within_bf16_rounding(tiny_dir):
    runs = bf16_runs(tiny_dir, "cpu", 0.1)
    assert torch.equal(runs["peft"][1], runs["fused"][1])
    assert_as_close_to_float32_as_peft(runs)


def test_fused_adapters_only_where_the_batch_plan_counts_on_them():
    """The memory model drops PEFT's dropout bytes exactly when training fuses the adapters."""
    from pigg.config import FastConfig
    from pigg.fast import fuse_adapters

    assert fuse_adapters(FastConfig())
    for off in ({"fused_lora": False}, {"torch_compile": True}, {"lora_input_fp32": True}):
        assert not fuse_adapters(FastConfig(**off)), off
