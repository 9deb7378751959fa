"""Small-scale reproductions of the Pangu papers' ablations (``mindpangu-ablate``).

suite.py reads ``yaml_configs/ablations/NAME.yaml`` into arms x learning rates x seeds; runner.py runs each in its
own process (worker.py: the trainer plus probes.py) and resumes; report.py writes results.csv, plots and
report.md with a verdict per paper claim. Metric definitions are in mindpangu/metrics.py.
"""
