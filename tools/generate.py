"""Thin wrapper: see `mindpangu.cli.generate_main`."""
from mindpangu.cli import generate_main

if __name__ == "__main__":
    generate_main()
