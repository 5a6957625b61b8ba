"""Classic 2-D densities fitted with any core flow: the end-to-end proof of the training stack."""
