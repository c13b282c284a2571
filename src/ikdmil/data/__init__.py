"""Sample records, manifests, image I/O, the Dataset, the preprocessing cache and the preparers."""
