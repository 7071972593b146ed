"""Training a small byte-level GPT with GQC: corpus, model, plots (used by ``gqc-train``)."""
