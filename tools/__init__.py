"""Command-line tools that read run folders: reports and benchmarks."""
