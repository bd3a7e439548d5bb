"""Locations of the Caffe definitions shipped with the repository."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOTXT_DIR = ROOT / "prototxt_equiv"
DEPLOY_PROTOTXT = PROTOTXT_DIR / "mspcnn_deploy.prototxt"
TRAIN_VAL_PROTOTXT = PROTOTXT_DIR / "mspcnn_train_val.prototxt"
