"""`python -m sparta_cli ...`, which is what `accelerate launch -m sparta_cli` runs."""

from sparta_cli.cli import main

if __name__ == "__main__":
    main()
