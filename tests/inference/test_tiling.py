"""Tiling geometry and the band stitcher: tiles blend into the output grid without seams."""

import numpy as np

from ikdmil.inference import BandStitcher, blend_window, slide_geometry


def test_band_stitcher_blends_overlapping_tiles_without_seams():
    geom = slide_geometry((200, 120), (0.5, 0.5), 0.5, tile=32, overlap=16, out_stride=4)
    assert geom.grid == (12, 7) and geom.out_size == (50, 30)
    prob = np.zeros((30, 50), np.uint8)
    mask = np.zeros_like(prob)
    st = BandStitcher(prob, mask, band=8, threshold=0.5)
    win = blend_window(8, 4)
    for r in range(geom.grid[1]):
        for c in range(geom.grid[0]):
            st.add(r * 4, c * 4, np.full((8, 8), 0.6, np.float32), win)
    st.close()
    assert (prob == 153).all() and (mask == 255).all()  # a constant map stays exactly constant
    assert st.tumour_px == st.tissue_px == 1500


def test_margin_windows_sum_to_one_across_an_overlap_and_ignore_tile_edges():
    from ikdmil.inference.tiling import blend_profile

    n, ramp, margin = 40, 16, 5  # output px: tiles of 40 overlapping by 16, 5 px of each edge get no weight
    a, b = blend_profile(n, ramp, margin=margin), blend_profile(n, ramp, margin=margin)
    both = a[n - ramp:] + b[:ramp]  # the overlap, from tile A's right end and tile B's left end
    assert np.allclose(both[margin:ramp - margin], 1.0, atol=1e-6)
    assert (a[:margin] <= 1e-3).all() and (a[-margin:] <= 1e-3).all() and (a[ramp:n - ramp] == 1).all()
    edge = blend_profile(n, ramp, margin=margin, first=True)  # on the slide's edge: no neighbour, full weight
    assert (edge[:n - ramp] == 1).all() and (edge[-margin:] <= 1e-3).all()
    assert np.array_equal(blend_window(n, ramp), np.outer(blend_profile(n, ramp), blend_profile(n, ramp)))


def test_large_tilings_cover_the_receptive_field_and_the_gaussian():
    from ikdmil.inference.tiling import large_tilings

    options = large_tilings(23, 4, 12, 4, (20000, 15000))  # VGG16 reach, sigma 3, out-stride 4
    for tile, overlap, margin in options:
        assert margin >= 23 + 12 and overlap >= 2 * margin and overlap % 4 == 0 and tile > overlap
    assert [o[0] for o in options] == [384, 512, 768, 1024, 1536, 2048]
    for tile, overlap, _ in large_tilings(120, 16, 12, 4, (20000, 15000)):  # ResNet-18: stride-aligned
        assert overlap % 16 == 0 and (tile - overlap) % 16 == 0
    assert [o[0] for o in large_tilings(23, 4, 12, 4, (300.5, 200))] == [304]  # a small slide: one tile covering it
    assert large_tilings(5000, 16, 12, 4, (20000, 15000)) == []  # wider than any large tile: small tiles


class _Blobs:
    """A stand-in tissue map: tissue inside the given level-0 squares (x, y, side), nowhere else."""

    def __init__(self, squares):
        self.squares = squares

    def fraction(self, x, y, w, h):
        inside = sum(max(0, min(x + w, sx + a) - max(x, sx)) * max(0, min(y + h, sy + a) - max(y, sy))
                     for sx, sy, a in self.squares)
        return inside / (w * h)


def test_cheapest_tiling_follows_the_tissue():
    from ikdmil.inference.tiling import cheapest_tiling, large_tilings, select_tiles, slide_geometry

    options = large_tilings(23, 4, 12, 4, (8192, 8192))
    assert [o[0] for o in options] == [384, 512, 768, 1024, 1536, 2048] and len({o[1] for o in options}) == 1

    def geometry(t, o, m):
        return slide_geometry((8192, 8192), (0.5, 0.5), 0.5, t, o, 4, m)

    dense = _Blobs([(0, 0, 8192)])
    scattered = _Blobs([(300 + 1900 * i, 700 * i, 150) for i in range(4)])
    for tissue, expect in ((dense, lambda t: t >= 1536), (scattered, lambda t: t <= 512)):
        (tile, _, _), geom, boxes, _ = cheapest_tiling(options, geometry, tissue, 0.0)
        assert expect(tile), tile  # all tissue: the overlap costs, large tiles win; islands: large ones are glass
        costs = [len(select_tiles(geometry(*o), tissue, 0.0)[0]) * o[0] ** 2 for o in options]
        assert len(boxes) * tile ** 2 == min(costs) and geom.tile == tile
