"""``python -m mvfouls_ab.tracking replay ...``; the command is mvfouls_ab/cli/tracking.py."""
from mvfouls_ab.cli.tracking import main, script

if __name__ == "__main__":
    script(main)
