"""Seed entry point, kept for its users: `python 1_vanilla_eval.py 0 --u 1 10`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "src"))
from pigg.seed_cli import vanilla_eval_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(vanilla_eval_main())
