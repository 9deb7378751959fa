"""Thin wrapper: see `mindpangu.cli.param_count_main`."""
from mindpangu.cli import param_count_main

if __name__ == "__main__":
    param_count_main()
