"""``python -m mvfouls_ab.rank`` (= ``mvfouls-ab rank``); the command is mvfouls_ab/cli/rank.py."""
from mvfouls_ab.cli.rank import main, script

if __name__ == "__main__":
    script(main)
