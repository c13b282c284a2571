"""Whole-slide I/O: the reader (OpenSlide / plain images), the pyramid TIFF writer, tissue detection, GeoJSON."""
