"""torch.compile for the language model's decoder layers (`fast.torch_compile`, off by default)."""
from pigg import config as C
from pigg.model.loading import unwrapped


def check_compile(fast_cfg, world: int) -> None:
    """Refuse torch.compile with several processes, before the model is loaded. Each process compiles
    a new graph whenever its micro-batches bring a new variant of the inputs (padding or none, ...),
    at steps of its own, and the others wait for it at the gradient all-reduce (docs/performance.md)."""
    if fast_cfg.torch_compile and world > 1:
        raise C.ConfigError("fast.torch_compile works with one process only: with several, each recompiles at "
                            "steps of its own and the others wait for it; leave it off")


def compile_decoder_layers(model) -> None:
    """torch.compile each decoder layer of the language model in place (regional compilation).

    The layers share one code object, so one compiled graph serves all of them; it is recompiled
    only for a new variant of the inputs: the first layer's input needs no gradient, a micro-batch
    with or without padding (attention mask or none), a micro-batch of 1. Shapes are dynamic, so
    a new sequence length reuses the graph. Parameter names, and so checkpoints, are unchanged.
    """
    import torch._dynamo

    layers = unwrapped(model).model.language_model.layers
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 32))
    for layer in layers:
        layer.compile(dynamic=True)
    print(f"torch.compile: {len(layers)} decoder layers (compiled during the first steps)")
    print("note: with LoRA the compiled loss falls faster in the first steps than eager's: eager bf16 rounds "
          "away most of the adapters' first small updates, compiled keeps them, as float32 does "
          "(docs/performance.md)")
