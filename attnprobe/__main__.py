"""``python -m attnprobe ...``: the command line, also under ``torchrun`` / ``accelerate launch -m attnprobe``."""
from attnprobe.cli import app

if __name__ == "__main__":
    app(prog_name="attnprobe")
