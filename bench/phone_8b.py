"""What every GPU benchmark starts from: synthetic phone users with 1080x2400 screenshots (966 image
tokens, about 1,054 tokens a sample) and a config folder of the real Qwen3-VL-8B architecture that
`model.random_weights` builds with random weights on the GPU."""
from pathlib import Path

from pigg.model.architectures import qwen3_vl_8b_config
from pigg.offline.synth import synthesize
from pigg.offline.tiny import make_config_folder


def phone_users_and_8b(root: Path, users: int, samples_per_user: int, seed: int = 0) -> tuple[Path, Path]:
    """(8B config folder, data root with users 1..`users`) under `root`."""
    data_dir = Path(root) / "data"
    synthesize(data_dir, users, samples_per_user=samples_per_user, seed=seed, width=1080, height=2400)
    return make_config_folder(Path(root) / "qwen3vl8b-random", qwen3_vl_8b_config()), data_dir
