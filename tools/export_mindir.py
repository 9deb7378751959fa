"""Thin wrapper: see `mindpangu.cli.export_main`."""
from mindpangu.cli import export_main

if __name__ == "__main__":
    export_main()
