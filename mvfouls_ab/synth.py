"""``python -m mvfouls_ab.synth`` (= ``mvfouls-ab synth``); the command is mvfouls_ab/cli/synth.py."""
from mvfouls_ab.cli.synth import main, script

if __name__ == "__main__":
    script(main)
