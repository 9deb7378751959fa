"""Thin wrapper: see `mindpangu.cli.sim_compile_main`."""
from mindpangu.cli import sim_compile_main

if __name__ == "__main__":
    sim_compile_main()
