"""Seed entry point, kept for its users: `python 4_finetune_person.py 0 --lora --users 1 2`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "src"))
from pigg.seed_cli import finetune_person_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(finetune_person_main())
