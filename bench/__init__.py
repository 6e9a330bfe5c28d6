"""`make bench`: throughput of each stage against the raw ceiling measured in the same run."""
