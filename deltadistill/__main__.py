"""``python -m deltadistill ...``: the command line, also under ``accelerate launch -m deltadistill``."""
from deltadistill.cli import app

if __name__ == "__main__":
    app(prog_name="deltadistill")
