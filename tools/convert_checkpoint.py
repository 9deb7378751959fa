"""Thin wrapper: see `mindpangu.cli.convert_main`."""
from mindpangu.cli import convert_main

if __name__ == "__main__":
    convert_main()
