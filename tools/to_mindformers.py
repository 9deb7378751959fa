"""Thin wrapper: see `mindpangu.cli.to_mindformers_main`."""
from mindpangu.cli import to_mindformers_main

if __name__ == "__main__":
    to_mindformers_main()
