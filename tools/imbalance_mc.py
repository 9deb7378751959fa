"""Thin wrapper: see `mindpangu.cli.imbalance_mc_main`."""
from mindpangu.cli import imbalance_mc_main

if __name__ == "__main__":
    imbalance_mc_main()
