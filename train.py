"""ReALLM entry point: `python train.py {fit,validate} --config configs/<phase>.yaml ...` (see README)."""

from reallm.run.cli import cli_main

if __name__ == "__main__":
    cli_main()
