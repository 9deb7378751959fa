"""Thin wrapper: see `mindpangu.cli.ablate_main`."""
from mindpangu.cli import ablate_main

if __name__ == "__main__":
    ablate_main()
