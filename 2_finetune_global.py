"""Seed entry point, kept for its users: `python 2_finetune_global.py 0 --lora [--u 11 83]`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "src"))
from pigg.seed_cli import finetune_global_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(finetune_global_main())
