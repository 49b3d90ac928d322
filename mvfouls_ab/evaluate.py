"""``python -m mvfouls_ab.evaluate`` (= ``mvfouls-ab evaluate``); the command is mvfouls_ab/cli/evaluate.py."""
from mvfouls_ab.cli.evaluate import main, script

if __name__ == "__main__":
    script(main)
