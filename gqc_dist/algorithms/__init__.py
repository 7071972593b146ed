"""One module per GQC algorithm: the wrapper class and its torch-gqc-compatible factories."""
