"""Thin wrapper: see `mindpangu.cli.simulate_main`."""
from mindpangu.cli import simulate_main

if __name__ == "__main__":
    simulate_main()
