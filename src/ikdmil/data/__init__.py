"""Training records: sample manifests, the Dataset and its preprocessing cache."""
