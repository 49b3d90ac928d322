"""``python -m mvfouls_ab.study`` (= ``mvfouls-ab study``); the command is mvfouls_ab/cli/study.py."""
from mvfouls_ab.cli.study import main, script

if __name__ == "__main__":
    script(main, signals=True)
