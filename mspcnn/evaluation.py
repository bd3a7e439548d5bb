"""Retrieval metrics.

So far: :func:`cross_camera_retrieval`, the validation score used during
training. The paper's protocols (Market-1501 official, CUHK03/CUHK01 classic
single-shot CMC) are not written yet.
"""
import numpy as np
import torch

__all__ = ["cross_camera_retrieval", "extract_features"]


def cross_camera_retrieval(features, ids, cameras):
    """Every image queries all the others; matches from the query's own
    camera are ignored (removed from the ranking), and queries without a
    same-identity image from another camera are skipped. Distances are
    Euclidean between L2-normalised features. Returns (rank-1, mAP) over the
    valid queries, mAP as the mean over queries of the non-interpolated AP
    (mean precision at each correct match), and the number of valid queries."""
    f = torch.nn.functional.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1)
    ids, cameras = np.asarray(ids), np.asarray(cameras)
    dist = torch.cdist(f, f).numpy()
    rank1, aps = [], []
    for q in range(len(ids)):
        keep = cameras != cameras[q]
        good = keep & (ids == ids[q])
        if not good.any():
            continue
        order = np.argsort(dist[q][keep], kind="stable")
        hits = good[keep][order]
        rank1.append(float(hits[0]))
        positions = np.flatnonzero(hits) + 1
        aps.append(float(np.mean(np.arange(1, len(positions) + 1) / positions)))
    if not rank1:
        return 0.0, 0.0, 0
    return float(np.mean(rank1)), float(np.mean(aps)), len(rank1)


@torch.no_grad()
def extract_features(backbone, db, transformer, batch_size=64, device="cpu"):
    """fc7_bn features (not normalised) of every record of a DatumDB, in order."""
    backbone.eval()
    feats = []
    for start in range(0, len(db), batch_size):
        images = db.read_list(range(start, min(start + batch_size, len(db))))[0]
        x = torch.from_numpy(transformer(images)).to(device)
        feats.append(backbone(x, logits=False)["fc7_bn"].float().cpu())
    return torch.cat(feats) if feats else torch.zeros(0, backbone.feature_dim)
