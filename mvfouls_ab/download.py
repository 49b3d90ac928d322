"""``python -m mvfouls_ab.download`` (= ``mvfouls-ab download``); the command is mvfouls_ab/cli/download.py."""
from mvfouls_ab.cli.download import main, script

if __name__ == "__main__":
    script(main)
