"""``python -m mvfouls_ab.ab`` (= ``mvfouls-ab ab``); the command is mvfouls_ab/cli/ab.py."""
from mvfouls_ab.cli.ab import main, script

if __name__ == "__main__":
    script(main)
