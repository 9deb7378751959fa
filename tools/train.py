"""Thin wrapper: see `mindpangu.cli.train_main`."""
from mindpangu.cli import train_main

if __name__ == "__main__":
    train_main()
