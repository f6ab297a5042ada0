"""pigg's learning rate by method: at LoRA's default the tiny model's loss falls step after step; at the
seed's 1e-6 it barely moves (the reason the default depends on the method)."""
from conftest import losses, tiny_run_config
from pigg import config as C
from pigg.offline.synth import synthesize
from pigg.train import train


def run(tiny_dir, data, out, learning_rate, steps=10):
    """LoRA steps on the same few samples every step (one batch holds them all), so the loss falls only as
    the adapters learn them."""
    cfg = tiny_run_config(tiny_dir, data, out, method="lora", learning_rate=learning_rate, max_steps=steps,
                          save_steps=steps, batch_size=4, grad_accum=1, effective_batch=4, lr_scheduler="constant")
    cfg.data.users = "1"
    folder = train(cfg)
    return C.load_yaml(folder / "pigg_config.yaml").train.learning_rate, losses(folder)


def test_lora_default_moves_the_loss_and_the_seeds_rate_barely_does(tiny_dir, tmp_path):
    data = tmp_path / "data"
    synthesize(data, [1], samples_per_user=4, seed=0, width=180, height=400)  # 4 samples with this seed
    lr, fast = run(tiny_dir, data, tmp_path / "default", None)
    seed_lr, slow = run(tiny_dir, data, tmp_path / "seed", 1e-6)
    assert (lr, seed_lr) == (1e-4, 1e-6)
    print(f"loss at lr 1e-4: {fast}\nloss at lr 1e-6: {slow}")
    assert fast[0] == slow[0]  # the same model and data: the first step's loss comes before any update
    # A random model starts near ln(vocabulary) = 11.9; ten LoRA steps at 1e-4 take about 0.06 off it, step
    # after step, and the same steps at 1e-6 a hundredth of that.
    assert all(b < a for a, b in zip(fast, fast[1:])) and fast[0] - fast[-1] > 0.04
    assert 0 <= slow[0] - slow[-1] < (fast[0] - fast[-1]) / 50
