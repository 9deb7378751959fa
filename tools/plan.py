"""Thin wrapper: see `mindpangu.cli.plan_main`."""
from mindpangu.cli import plan_main

if __name__ == "__main__":
    plan_main()
