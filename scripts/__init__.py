"""Data preparation, downloads and benchmarks; run each as a module from the repository root:
``python -m scripts.<name>``."""
