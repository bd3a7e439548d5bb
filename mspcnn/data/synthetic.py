"""A synthetic pedestrian dataset in the Market-1501 layout.

People are drawn procedurally from identity attributes -- skin and hair
colour, hair length, upper and lower clothing colours and patterns (plain,
stripes, checks, dots, a chest logo) with a pattern scale, shorts or trousers,
shoes, a bag or backpack on one side, build. Only the identity is shared by the
images of a person: each image has its own background (colour and clutter: a
person is seen in many places, and a camera sees many people in one place),
its own lighting, scale, crop and pose (mirrored half the time), and may be
partly occluded; each camera adds its colour cast and blur. So the way to match
two images is the person, not the scene.

What makes it hard, as real re-identification is: colours come from shared
palettes (many identities share their main colours and differ in patterns,
bags, hair, build), the lighting and the cameras' colour casts change every
colour, blur and JPEG compression remove fine patterns, crops and occluders
hide parts of the body, backgrounds are cluttered with person-coloured shapes,
and a third of the images of the gallery are other people seen by the same
camera.

The output follows Market-1501 (docs/evaluation.md): ``bounding_box_train/``,
``bounding_box_test/`` (with distractors ``0000`` and junk ``-1``) and
``query/``, files ``PPPP_cCsS_FFFFFF_BB.jpg``, 128 x 64 images, so the same
converter and protocols apply. Everything is drawn from one seed.
"""
import os
import time

import cv2
import numpy as np

__all__ = ["make_synthetic_market", "draw_person", "Identity"]

H, W = 128, 64
CLOTHES = [(40, 40, 40), (230, 230, 230), (40, 40, 170), (160, 60, 30), (40, 130, 40),
           (30, 160, 200), (120, 40, 120), (90, 90, 90), (20, 60, 110), (180, 170, 120),
           (60, 30, 140), (150, 150, 40)]  # BGR
SKIN = [(140, 170, 225), (110, 145, 200), (80, 110, 165), (60, 80, 120), (170, 195, 235)]
HAIR = [(20, 20, 20), (30, 45, 80), (50, 90, 150), (130, 130, 130), (20, 30, 50)]
PATTERNS = ["plain", "hstripes", "vstripes", "checks", "dots", "logo"]


class Identity:
    """The appearance of one person, drawn from ``rng``."""

    def __init__(self, rng):
        self.skin = SKIN[rng.integers(len(SKIN))]
        self.hair = HAIR[rng.integers(len(HAIR))]
        self.long_hair = bool(rng.random() < 0.35)
        c = rng.choice(len(CLOTHES), 4, replace=False)
        self.upper, self.upper2 = CLOTHES[c[0]], CLOTHES[c[1]]
        self.lower, self.lower2 = CLOTHES[c[2]], CLOTHES[c[3]]
        self.upper_pattern = PATTERNS[rng.integers(len(PATTERNS))]
        self.lower_pattern = ["plain", "plain", "hstripes", "vstripes"][rng.integers(4)]
        self.period = int(rng.integers(3, 9))  # pattern scale in pixels
        self.logo_y = float(rng.uniform(0.25, 0.7))
        self.shorts = bool(rng.random() < 0.3)
        self.shoes = CLOTHES[rng.integers(len(CLOTHES))]
        self.bag = ["none", "left", "right", "backpack"][rng.integers(4)]
        self.bag_color = CLOTHES[rng.integers(len(CLOTHES))]
        self.width = float(rng.uniform(0.8, 1.15))
        self.height = float(rng.uniform(0.88, 1.0))


class Camera:
    """What a camera adds to every image it takes: a colour cast, a gain and a blur. The scene
    (background, clutter, lighting, occlusion) is drawn per image, not per camera."""

    def __init__(self, rng):
        self.gain = float(rng.uniform(0.75, 1.2))
        self.cast = rng.uniform(0.85, 1.15, 3)
        self.blur = float(rng.uniform(0.0, 1.0))
        self.occlusion = 0.2  # probability that an image is partly occluded


def _fill(img, x0, y0, x1, y1, pattern, c1, c2, period, logo_y=0.5):
    x0, y0, x1, y1 = (int(round(v)) for v in (x0, y0, x1, y1))
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x1, img.shape[1]), min(y1, img.shape[0])
    if x1 <= x0 or y1 <= y0:
        return
    region = img[y0:y1, x0:x1]
    region[:] = c1
    yy, xx = np.mgrid[0:y1 - y0, 0:x1 - x0]
    if pattern == "hstripes":
        region[(yy // period) % 2 == 1] = c2
    elif pattern == "vstripes":
        region[(xx // period) % 2 == 1] = c2
    elif pattern == "checks":
        region[((yy // period) + (xx // period)) % 2 == 1] = c2
    elif pattern == "dots":
        region[((yy % (2 * period)) < 2) & ((xx % (2 * period)) < 2)] = c2
    elif pattern == "logo":
        cy, cx = int((y1 - y0) * logo_y), (x1 - x0) // 2
        cv2.circle(region, (cx, cy), max(2, period // 2 + 1), c2, -1)


def draw_person(ident, cam, rng, occlude=True):
    """One 128 x 64 BGR image of ``ident`` seen by ``cam``."""
    img = np.empty((H, W, 3), np.uint8)
    img[:] = rng.integers(30, 220, 3)  # this image's background
    for _ in range(int(rng.integers(2, 8))):  # background clutter
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            x, y = rng.integers(0, W), rng.integers(0, H)
            cv2.rectangle(img, (int(x), int(y)), (int(x + rng.integers(4, 30)), int(y + rng.integers(4, 40))),
                          color, -1)
        else:
            cv2.line(img, (int(rng.integers(0, W)), int(rng.integers(0, H))),
                     (int(rng.integers(0, W)), int(rng.integers(0, H))), color, int(rng.integers(1, 3)))
    scale = ident.height * rng.uniform(0.85, 1.05)
    top = rng.uniform(1, 12)
    height = (H - top - 2) * scale
    cx = W / 2 + rng.uniform(-6, 6)
    half = 12 * ident.width * rng.uniform(0.95, 1.05)
    y = lambda f: top + f * height  # noqa: E731
    # legs, shoes
    leg_w = half * 0.8
    for side in (-1, 1):
        x0 = cx + (0 if side > 0 else -leg_w) + side * 0.5
        _fill(img, x0, y(0.52), x0 + leg_w, y(0.94), ident.lower_pattern, ident.lower, ident.lower2,
              ident.period)
        if ident.shorts:
            _fill(img, x0, y(0.68), x0 + leg_w, y(0.94), "plain", ident.skin, ident.skin, 1)
        _fill(img, x0 - 1, y(0.94), x0 + leg_w + 1, y(0.99), "plain", ident.shoes, ident.shoes, 1)
    # backpack behind the torso
    if ident.bag == "backpack":
        _fill(img, cx - half - 3, y(0.2), cx + half + 3, y(0.45), "plain", ident.bag_color,
              ident.bag_color, 1)
    # torso and arms
    _fill(img, cx - half, y(0.17), cx + half, y(0.53), ident.upper_pattern, ident.upper, ident.upper2,
          ident.period, ident.logo_y)
    for side in (-1, 1):
        x0 = cx + side * half - (4 if side > 0 else 0)
        _fill(img, x0 + (0 if side > 0 else -4), y(0.18), x0 + (4 if side > 0 else 0), y(0.5), "plain",
              ident.upper, ident.upper, 1)
    # head and hair
    head_r = max(4, int(half * 0.55))
    hc = (int(cx), int(y(0.09)))
    if ident.long_hair:
        _fill(img, cx - head_r - 1, y(0.05), cx + head_r + 1, y(0.24), "plain", ident.hair, ident.hair, 1)
    cv2.ellipse(img, hc, (head_r, int(head_r * 1.25)), 0, 0, 360, ident.skin, -1)
    cv2.ellipse(img, hc, (head_r + 1, int(head_r * 1.25) + 1), 0, 180, 360, ident.hair, -1)
    # bag on one side
    if ident.bag in ("left", "right"):
        s = -1 if ident.bag == "left" else 1
        bx = cx + s * (half + 4)
        _fill(img, bx - 5, y(0.42), bx + 5, y(0.58), "plain", ident.bag_color, ident.bag_color, 1)
        cv2.line(img, (int(bx), int(y(0.42))), (int(cx - s * half * 0.5), int(y(0.18))),
                 ident.bag_color, 1)
    # partial occlusion (a passer-by or an object)
    if occlude and rng.random() < cam.occlusion:
        oh = int(rng.integers(H // 5, H // 2))
        ow = int(rng.integers(W // 4, W // 2))
        ox = int(rng.integers(0, W - ow))
        oy = int(rng.integers(H // 3, H - oh))
        img[oy:oy + oh, ox:ox + ow] = rng.integers(0, 256, 3)
    if rng.random() < 0.5:  # facing the other way
        img = np.ascontiguousarray(img[:, ::-1])
    # this image's lighting, then the camera: gain, colour cast, blur; sensor noise
    light = rng.uniform(0.75, 1.25) * rng.uniform(0.92, 1.08, 3)
    out = img.astype(np.float32) * light * (cam.gain * cam.cast)
    if cam.blur > 0.2:
        out = cv2.GaussianBlur(out, (0, 0), cam.blur)
    out += rng.normal(0, 4, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def make_synthetic_market(out_dir, train_ids=200, test_ids=200, cameras=6, images_per_camera=(1, 3),
                          distractors=100, junk=40, seed=0, progress=True):
    """Write a synthetic Market-1501-style dataset to ``out_dir``.

    Each identity is seen by 2..cameras cameras, 1..3 images per camera.
    Training ids are 1..train_ids; test ids follow. The query holds one image
    per test id and camera, the gallery the other images of the test ids, plus
    ``distractors`` people with id 0000 and ``junk`` images with id -1.
    Returns a summary dict of counts."""
    if train_ids < 2 or test_ids < 2 or cameras < 2:
        raise ValueError("make_synthetic_market: need >= 2 train ids, >= 2 test ids, >= 2 cameras")
    rng = np.random.default_rng(seed)
    cams = [Camera(rng) for _ in range(cameras)]
    dirs = {k: os.path.join(out_dir, k) for k in ("bounding_box_train", "bounding_box_test", "query")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    counts = {k: 0 for k in dirs}
    frame = 0
    start = time.time()

    def save(folder, pid, cam, img):
        nonlocal frame
        frame += 1
        name = f"{pid:04d}" if pid >= 0 else "-1"
        path = os.path.join(dirs[folder], f"{name}_c{cam + 1}s1_{frame:06d}_00.jpg")
        if not cv2.imwrite(path, img, [cv2.IMWRITE_JPEG_QUALITY, 92]):
            raise OSError(f"make_synthetic_market: could not write {path}")
        counts[folder] += 1

    total = train_ids + test_ids
    for pid in range(1, total + 1):
        ident = Identity(rng)
        seen = rng.choice(cameras, int(rng.integers(2, cameras + 1)), replace=False)
        for cam in seen:
            n = int(rng.integers(images_per_camera[0], images_per_camera[1] + 1))
            if pid > train_ids:
                save("query", pid, cam, draw_person(ident, cams[cam], rng))
            for _ in range(n):
                folder = "bounding_box_train" if pid <= train_ids else "bounding_box_test"
                save(folder, pid, cam, draw_person(ident, cams[cam], rng))
        if progress and pid % 100 == 0:
            print(f"  synthetic: {pid}/{total} identities ({time.time() - start:.1f} s)", flush=True)
    for _ in range(distractors):
        cam = int(rng.integers(cameras))
        save("bounding_box_test", 0, cam, draw_person(Identity(rng), cams[cam], rng))
    for _ in range(junk):  # junk: mostly background, a sliver of a person
        cam = int(rng.integers(cameras))
        img = draw_person(Identity(rng), cams[cam], rng)
        img[:, : int(rng.integers(40, 60))] = img[0, -1]
        save("bounding_box_test", -1, cam, img)
    return {"train_images": counts["bounding_box_train"], "gallery_images": counts["bounding_box_test"],
            "query_images": counts["query"], "train_ids": train_ids, "test_ids": test_ids,
            "cameras": cameras, "seconds": round(time.time() - start, 1)}
