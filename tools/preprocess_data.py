"""Thin wrapper: see `mindpangu.cli.preprocess_main`."""
from mindpangu.cli import preprocess_main

if __name__ == "__main__":
    preprocess_main()
