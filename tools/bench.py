"""Thin wrapper: see `mindpangu.cli.bench_main`."""
from mindpangu.cli import bench_main

if __name__ == "__main__":
    bench_main()
