"""Everything printed goes to the terminal and to the run's log file at once (the seed's TeeLogger)."""
import sys
import time
from contextlib import contextmanager
from pathlib import Path


class Tee:
    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)
        return len(text)

    def flush(self):
        self.stream.flush()
        self.file.flush()

    def isatty(self):
        return self.stream.isatty()

    def fileno(self):
        return self.stream.fileno()


def log_path(log_dir, stem: str) -> Path:
    return Path(log_dir) / f"{stem}_{time.strftime('%Y%m%d_%H%M%S')}.log"


@contextmanager
def tee_output(path):
    """Copy stdout and stderr into `path` for the duration of the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as f:
        old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(old[0], f), Tee(old[1], f)
        try:
            yield path
        finally:
            sys.stdout, sys.stderr = old


@contextmanager
def quiet_stdout():
    """Drop what is printed for the duration of the block (stderr, with warnings and errors, stays)."""
    import contextlib
    import os

    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield
