"""Plots drawn with OpenCV (no plotting dependency): CMC curves, learning curves and ranking
pictures."""
import cv2
import numpy as np

__all__ = ["draw_cmc", "draw_curves", "draw_ranking", "RIGHT", "WRONG", "UNKNOWN"]

COLORS = [(200, 80, 30), (40, 40, 200), (40, 160, 40), (150, 60, 150), (30, 150, 200),
          (0, 0, 0), (140, 140, 0), (60, 100, 160)]  # BGR; distinct up to 8 series


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


def _panel(img, box, series, title, ylabel, x_max, y_range, percent=False):
    """One panel of :func:`draw_curves`: ``series`` {name: (xs, ys)} inside ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    lo, hi = y_range
    if hi <= lo:
        hi = lo + 1.0
    x = lambda v: int(x0 + v / max(x_max, 1e-9) * (x1 - x0))  # noqa: E731
    y = lambda v: int(y1 - (v - lo) / (hi - lo) * (y1 - y0))  # noqa: E731
    font = cv2.FONT_HERSHEY_SIMPLEX
    for v in np.linspace(lo, hi, 5):
        cv2.line(img, (x0, y(v)), (x1, y(v)), (225, 225, 225), 1)
        label = f"{100 * v:.0f}%" if percent else f"{v:.3g}"
        cv2.putText(img, label, (x0 - 55, y(v) + 4), font, 0.4, (80, 80, 80), 1)
    for v in np.linspace(0, x_max, 5):
        cv2.putText(img, f"{v:.0f}", (x(v) - 10, y1 + 16), font, 0.4, (80, 80, 80), 1)
    cv2.rectangle(img, (x0, y0), (x1, y1), (0, 0, 0), 1)
    cv2.putText(img, title, (x0, y0 - 10), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, ylabel, (x0 + 5, y0 + 15), font, 0.4, (80, 80, 80), 1, cv2.LINE_AA)
    lines = [np.array([(x(a), y(b)) for a, b in zip(xs, ys) if np.isfinite(b)], np.int32)
             for xs, ys in series.values()]
    width = max(cv2.getTextSize(name, font, 0.4, 1)[0][0] for name in series) + 10
    legend_top = _legend_top(lines, (x1 - width, x1), (y0 + 4, y1 - 4), 16 * len(series) + 6)
    for k, (name, pts) in enumerate(zip(series, lines)):
        color = COLORS[k % len(COLORS)]
        if len(pts) > 1:
            cv2.polylines(img, [pts], False, color, 2, cv2.LINE_AA)
        for p in pts if len(pts) <= 40 else []:
            cv2.circle(img, tuple(int(c) for c in p), 3, color, -1, cv2.LINE_AA)
        cv2.putText(img, name, (x1 - width, legend_top + 14 + 16 * k), font, 0.4, color, 1, cv2.LINE_AA)


def _legend_top(lines, x_range, y_range, height):
    """The top edge of a legend ``height`` pixels tall in the panel's right-hand corner that the
    curves (``lines``, arrays of (x, y) pixels) cross less: the top corner (``y_range[0]``) or the
    bottom one; the top on a tie. A curve counts at every pixel column of the legend's width, its
    height there interpolated between its points."""
    (left, right), (top, bottom) = x_range, y_range
    cols = np.arange(left, right + 1)
    hits = {top: 0, bottom - height: 0}
    for pts in lines:
        if len(pts) == 0:
            continue
        order = np.argsort(pts[:, 0], kind="stable")
        xs, ys = pts[order, 0], pts[order, 1]
        inside = cols[(cols >= xs[0]) & (cols <= xs[-1])]
        at = np.interp(inside, xs, ys)
        for edge in hits:
            hits[edge] += int(((at >= edge) & (at <= edge + height)).sum())
    return min(hits, key=lambda edge: (hits[edge], edge))


def draw_curves(path, loss, score, title="learning curve", xlabel="iteration", score_label="rank-1",
                size=(720, 720)):
    """A learning curve to a PNG at ``path``: two panels sharing the iteration axis, the training
    loss on top (``loss`` {name: (iterations, values)}) and a validation score in [0, 1] below
    (``score`` {name: (iterations, values)}), with legends."""
    if not loss and not score:
        raise ValueError("draw_curves: nothing to draw")
    h, w = size
    img = np.full((h, w, 3), 255, np.uint8)
    everything = list(loss.values()) + list(score.values())
    x_max = max(max(xs) for xs, _ in everything if len(xs)) if any(len(xs) for xs, _ in everything) else 1
    left, right = 70, 20
    half = (h - 60) // 2
    if loss:
        vals = np.concatenate([np.asarray(v, float) for _, v in loss.values()])
        vals = vals[np.isfinite(vals)]
        lo, hi = (float(vals.min()), float(vals.max())) if len(vals) else (0.0, 1.0)
        _panel(img, (left, 40, w - right, 40 + half - 40), loss, title, "training loss", x_max, (min(0.0, lo), hi))
    if score:
        vals = np.concatenate([np.asarray(v, float) for _, v in score.values()])
        hi = float(np.nanmax(vals)) if len(vals) else 1.0
        _panel(img, (left, 40 + half + 20, w - right, h - 40), score, "", f"validation {score_label}",
               x_max, (0.0, min(1.0, max(0.1, np.ceil(hi * 10) / 10))), percent=True)
    cv2.putText(img, xlabel, (w // 2 - 30, h - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"draw_curves: could not write {path}")


RIGHT, WRONG, UNKNOWN = (0, 190, 0), (0, 0, 230), (170, 170, 170)  # BGR borders of ranked images


def _caption(width, lines, font_scale=0.36):
    """White strip of ``width`` pixels with one or two short lines of dark text."""
    h = 6 + 13 * len(lines)
    strip = np.full((h, width, 3), 255, np.uint8)
    for k, text in enumerate(lines):
        size = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)[0][0]
        x = max(1, (width - size) // 2)
        cv2.putText(strip, text, (x, 13 + 13 * k), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (40, 40, 40), 1, cv2.LINE_AA)
    return strip


def _wrap(text, width, scale=0.4):
    """``text`` cut at spaces into lines no wider than ``width`` pixels in OpenCV's simplex font."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and cv2.getTextSize(trial, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines or [""]


def draw_ranking(path, rows, border=4, gap=4, legend=None, min_height=0):
    """Draw a ranking picture to a PNG at ``path``: one line per query, the query image on the
    left, then its ranked gallery images, each framed by a ``border``-pixel frame whose colour
    says whether it is the query's identity (``RIGHT`` green, ``WRONG`` red, ``UNKNOWN`` grey when
    identities are not known). White ``gap``s keep the frames apart, so a green frame stays visible
    against a green background.

    ``rows``: a list of ``(query, ranked)``. ``query`` is an H x W x 3 uint8 BGR image, or
    ``(image, caption)``; ``ranked`` a list of ``(image, colour)`` or ``(image, colour, caption)``.
    A caption (a string; "|" separates two lines, e.g. "#1|d 0.83") is written under its image.
    ``legend``: lines of text drawn above the picture, after a key to the frame colours, wrapped
    to its width. Lines of different lengths are padded with white. ``min_height``: images lower
    than it (e.g. those of a net trained at a small input size) are enlarged by the whole factor
    that brings the first query nearest to it, pixels repeated, so that tiles and captions stay
    legible."""
    if not rows:
        raise ValueError("draw_ranking: no rows")
    first = rows[0][0][0] if isinstance(rows[0][0], tuple) else rows[0][0]
    zoom = max(1, int(round(min_height / max(1, np.shape(first)[0]))))

    def framed(img, colour, caption=None):
        img = np.ascontiguousarray(img, dtype=np.uint8)
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"draw_ranking: images must be H x W x 3, got shape {img.shape}")
        if zoom > 1:
            img = np.repeat(np.repeat(img, zoom, axis=0), zoom, axis=1)
        img = cv2.copyMakeBorder(img, border, border, border, border, cv2.BORDER_CONSTANT, value=colour)
        img = cv2.copyMakeBorder(img, gap, gap, gap, gap, cv2.BORDER_CONSTANT, value=(255, 255, 255))
        if caption is not None:
            img = np.concatenate([img, _caption(img.shape[1], str(caption).split("|"))], axis=0)
        return img

    captioned = any(isinstance(q, tuple) for q, _ in rows) or any(len(item) > 2 for _, r in rows for item in r)
    lines = []
    for query, ranked in rows:
        q_img, q_cap = query if isinstance(query, tuple) else (query, None)
        tiles = [framed(q_img, (255, 255, 255), q_cap if q_cap is not None else ("" if captioned else None))]
        for item in ranked:
            img, colour = item[0], item[1]
            cap = item[2] if len(item) > 2 else ("" if captioned else None)
            tiles.append(framed(img, colour, cap))
        height = max(t.shape[0] for t in tiles)
        tiles = [np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0)), constant_values=255) for t in tiles]
        tiles.insert(1, np.full((height, 3 * gap, 3), 255, np.uint8))  # the query stands apart
        lines.append(np.concatenate(tiles, axis=1))
    width = max(line.shape[1] for line in lines)
    lines = [np.pad(line, ((0, 0), (0, width - line.shape[1]), (0, 0)), constant_values=255) for line in lines]
    if legend is not None:
        legend = [wrapped for text in legend for wrapped in _wrap(text, width - 12)]
        head = np.full((22 + 16 * len(legend), width, 3), 255, np.uint8)
        x = 6
        for colour, label in ((RIGHT, "same person as the query"), (WRONG, "another person"),
                              (UNKNOWN, "identity not known")):
            cv2.rectangle(head, (x, 5), (x + 12, 17), colour, 3)
            cv2.putText(head, label, (x + 18, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (40, 40, 40), 1, cv2.LINE_AA)
            x += 30 + cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)[0][0]
        for k, text in enumerate(legend):
            cv2.putText(head, text, (6, 34 + 16 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (40, 40, 40), 1, cv2.LINE_AA)
        lines.insert(0, head)
    if not cv2.imwrite(str(path), np.concatenate(lines, axis=0)):
        raise OSError(f"draw_ranking: could not write {path}")
