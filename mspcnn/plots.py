"""Plots drawn with OpenCV (no plotting dependency): CMC curves."""
import cv2
import numpy as np

__all__ = ["draw_cmc"]

COLORS = [(200, 80, 30), (40, 40, 200), (40, 160, 40), (150, 60, 150), (30, 150, 200)]  # BGR


def draw_cmc(curves, path, max_rank=20, size=(480, 640), title="CMC"):
    """Draw CMC curves {name: matching rate per rank (1-based ranks), in [0, 1]}
    to a PNG at ``path``: rank 1..max_rank on x, 0-100% on y, with a legend."""
    if not curves:
        raise ValueError("draw_cmc: no curves")
    h, w = size
    img = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 60, 20, 40, 50
    x = lambda r: int(left + (r - 1) / max(max_rank - 1, 1) * (w - left - right))  # noqa: E731
    y = lambda v: int(h - bottom - v * (h - top - bottom))  # noqa: E731
    for v in np.linspace(0, 1, 6):
        cv2.line(img, (left, y(v)), (w - right, y(v)), (225, 225, 225), 1)
        cv2.putText(img, f"{int(v * 100)}%", (8, y(v) + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (80, 80, 80), 1)
    for r in (1, 5, 10, 15, 20):
        if r <= max_rank:
            cv2.putText(img, str(r), (x(r) - 4, h - bottom + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (80, 80, 80), 1)
    cv2.rectangle(img, (left, top), (w - right, h - bottom), (0, 0, 0), 1)
    cv2.putText(img, "rank", (w // 2 - 15, h - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    cv2.putText(img, title, (left, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1)
    for k, (name, cmc) in enumerate(curves.items()):
        cmc = np.asarray(cmc, float)[:max_rank]
        color = COLORS[k % len(COLORS)]
        pts = np.array([(x(r + 1), y(v)) for r, v in enumerate(cmc)], np.int32)
        cv2.polylines(img, [pts], False, color, 2, cv2.LINE_AA)
        cv2.putText(img, f"{name}: rank-1 {100 * cmc[0]:.1f}%", (left + 10, top + 20 + 18 * k),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1, cv2.LINE_AA)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"draw_cmc: could not write {path}")
