"""Seed entry point, kept for its users: `python 3_eval_checkpoint.py 0 --checkpoint DIR --u 1 10 [--lora]`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "src"))
from pigg.seed_cli import eval_checkpoint_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(eval_checkpoint_main())
