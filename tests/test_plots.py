"""The OpenCV pictures: ranking frames and CMC curves, read back from the PNG files."""
import cv2
import numpy as np
import pytest

from mspcnn.plots import RIGHT, UNKNOWN, WRONG, draw_cmc, draw_ranking


def solid(h, w, bgr):
    return np.full((h, w, 3), bgr, np.uint8)


def test_ranking_frames_gaps_and_padding(tmp_path):
    green_bg = (0, 190, 0)  # a gallery image as green as the RIGHT frame: the white gap separates them
    rows = [(solid(20, 10, (50, 50, 50)), [(solid(20, 10, green_bg), RIGHT), (solid(20, 10, (9, 9, 9)), WRONG)]),
            (solid(20, 10, (60, 60, 60)), [(solid(20, 10, (9, 9, 9)), UNKNOWN)])]
    draw_ranking(tmp_path / "r.png", rows, border=4, gap=4)
    img = cv2.imread(str(tmp_path / "r.png"))
    tile = 10 + 2 * 4 + 2 * 4  # image + frame + gap, on each side
    line_h = 20 + 2 * 4 + 2 * 4
    assert img.shape == (2 * line_h, 3 * tile + 12, 3)  # query, separator (3 gaps), two ranked images
    x0 = tile + 12  # first ranked tile
    y = line_h // 2
    assert tuple(img[y, x0 + 4 + 1]) == RIGHT  # inside the frame
    assert tuple(img[y, x0 + 1]) == (255, 255, 255)  # the gap outside it
    assert tuple(img[y, x0 + 8 + 5]) == green_bg
    assert tuple(img[y, x0 + tile + 4 + 1]) == WRONG
    assert tuple(img[line_h + y, x0 + 4 + 1]) == UNKNOWN
    assert tuple(img[line_h + y, x0 + tile + 5]) == (255, 255, 255)  # the shorter line is padded white
    assert tuple(img[y, 8 + 5]) == (50, 50, 50)  # the query, unframed (white frame)


def test_ranking_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no rows"):
        draw_ranking(tmp_path / "r.png", [])
    with pytest.raises(ValueError, match="H x W x 3"):
        draw_ranking(tmp_path / "r.png", [(np.zeros((20, 10), np.uint8), [])])
    with pytest.raises(OSError, match="could not write"):
        draw_ranking(tmp_path / "missing" / "r.png", [(solid(20, 10, (0, 0, 0)), [])])


def test_cmc_curve_is_drawn(tmp_path):
    draw_cmc({"a": np.linspace(0.1, 1.0, 20), "b": np.full(20, 0.5)}, tmp_path / "c.png")
    img = cv2.imread(str(tmp_path / "c.png"))
    assert img.shape == (480, 640, 3) and (img != 255).any(axis=2).mean() > 0.01
    with pytest.raises(ValueError, match="no curves"):
        draw_cmc({}, tmp_path / "c.png")


def test_ranking_captions_and_legend(tmp_path):
    """Captions under the images (rank and distance), a legend with the colour key on top."""
    rows = [((solid(40, 20, (50, 50, 50)), "id 7|cam 1"),
             [(solid(40, 20, (200, 200, 200)), RIGHT, "#1|d 0.31"), (solid(40, 20, (9, 9, 9)), WRONG, "#2|d 0.52")])]
    draw_ranking(tmp_path / "plain.png", [(r[0][0], [x[:2] for x in r[1]]) for r in rows])
    draw_ranking(tmp_path / "r.png", rows, legend=["the rule"])  # fits on one line
    plain, img = cv2.imread(str(tmp_path / "plain.png")), cv2.imread(str(tmp_path / "r.png"))
    assert img.shape[1] == plain.shape[1] and img.shape[0] == plain.shape[0] + 32 + 38  # captions + legend
    legend, tiles = img[:38], img[38:]
    assert (np.abs(legend.astype(int) - np.array(RIGHT)).sum(2) < 30).any()  # the colour key
    caption = tiles[plain.shape[0]:]
    assert (caption < 128).any()  # dark text under the images
    assert (tiles[: plain.shape[0]] == plain).all()


def test_learning_curves(tmp_path):
    from mspcnn.plots import draw_curves

    it = np.arange(0, 200, 20)
    draw_curves(tmp_path / "c.png", {"seed 0": (it, 6 - it / 50)}, {"seed 0": (it[::2], it[::2] / 400)})
    img = cv2.imread(str(tmp_path / "c.png"))
    assert img.shape == (720, 720, 3) and (np.abs(img.astype(int) - np.array([200, 80, 30])).sum(2) < 40).sum() > 300
    with pytest.raises(ValueError, match="nothing to draw"):
        draw_curves(tmp_path / "d.png", {}, {})


def test_a_panels_legend_takes_the_corner_its_curves_leave_free(tmp_path):
    """The legend goes to the right-hand corner (top or bottom) that the curves cross less: below a
    rising validation curve, above a falling loss, at the top when neither corner is crossed."""
    from mspcnn.plots import _legend_top, draw_curves

    rising = np.array([(x, 300 - x) for x in range(0, 301, 30)])  # pixel y grows downwards
    falling = rising[:, ::-1].copy()
    falling[:, 0] = rising[:, 0]
    flat = np.array([(0, 150), (300, 150)])
    assert _legend_top([rising], (200, 300), (0, 300), 40) == 260
    assert _legend_top([falling], (200, 300), (0, 300), 40) == 0
    assert _legend_top([flat], (200, 300), (0, 300), 40) == 0
    it = np.arange(0, 200, 20)
    draw_curves(tmp_path / "c.png", {"seed 0": (it, 6 - it / 50)}, {"seed 0": (it, 0.1 + it / 250)})
    img = cv2.imread(str(tmp_path / "c.png")).astype(int)
    blue = (np.abs(img - np.array([200, 80, 30])).sum(2) < 60)
    text = slice(720 - 20 - 40, 720 - 20 - 10)  # where "seed 0" stands, right-aligned in a panel
    upper, lower = blue[40:370, text], blue[390:680, text]  # the loss panel, the validation panel
    # The curves leave the loss panel's top right and the validation panel's bottom right free: what
    # is blue there is the legend.
    assert upper[:30].sum() > 20 and upper[-30:].sum() == 0
    assert lower[-30:].sum() > 20 and lower[:30].sum() < 20


def test_ranking_enlarges_small_images_and_wraps_the_legend(tmp_path):
    """Small images (a net trained at 64 x 24) are enlarged by a whole factor, pixels repeated;
    a legend longer than the picture is wrapped onto more lines instead of being cut."""
    rows = [((solid(32, 12, (50, 50, 50)), "id 7|cam 1"), [(solid(32, 12, (9, 9, 9)), WRONG, "#1|d 0.5")])]
    text = "a long legend line " * 8
    draw_ranking(tmp_path / "small.png", rows, legend=[text])
    draw_ranking(tmp_path / "big.png", rows, legend=[text], min_height=128)  # 32 x 4 = 128
    small, big = cv2.imread(str(tmp_path / "small.png")), cv2.imread(str(tmp_path / "big.png"))
    assert small.shape[1] == 2 * (12 + 16) + 12 and big.shape[1] == 2 * (4 * 12 + 16) + 12
    tiles_big = big[-(4 * 32 + 16 + 32):]  # image, frame and gap, caption
    assert (tiles_big[8 + 4 * 5: 8 + 4 * 6, 8:8 + 48] == 50).all()  # the query, 4 x 4 pixels per pixel
    heads = [img[: img.shape[0] - (h + 16 + 32)] for img, h in ((small, 32), (big, 4 * 32))]
    lines = [(h.shape[0] - 22) // 16 for h in heads]
    assert lines[0] > lines[1] > 1  # the narrower picture takes more lines
    for head in heads:  # every legend line fits: no text in the last columns (below the colour key)
        assert not (head[22:, -3:] < 128).any()
