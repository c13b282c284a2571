"""Offline fakes that write real formats: GlaS folders, tiled pyramidal slides, ASAP XML, DigestPath."""
