"""``python -m mvfouls_ab.predict`` (= ``mvfouls-ab predict``); the command is mvfouls_ab/cli/predict.py."""
from mvfouls_ab.cli.predict import main, script

if __name__ == "__main__":
    script(main)
