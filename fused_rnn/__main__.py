"""``python -m fused_rnn``: the command line of the char-model application (fused_rnn/app/cli.py)."""
import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
