"""``python -m mvfouls_ab.report`` (= ``mvfouls-ab report``); the command is mvfouls_ab/cli/report.py."""
from mvfouls_ab.cli.report import main, script

if __name__ == "__main__":
    script(main)
