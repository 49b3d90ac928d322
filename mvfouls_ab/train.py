"""``python -m mvfouls_ab.train`` (= ``mvfouls-ab train``); the command is mvfouls_ab/cli/train.py."""
from mvfouls_ab.cli.train import main, script

if __name__ == "__main__":
    script(main, signals=True)
