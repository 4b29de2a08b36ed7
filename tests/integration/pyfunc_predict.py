"""Run by test_package.py in a fresh virtual environment holding only the logged model's
requirements: load the model folder with mlflow.pyfunc, predict the test's requests, and
write the images and where vdvae_dist was imported from.

    python pyfunc_predict.py MODEL_DIR OUT_DIR
"""
import json
import sys
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

model_dir, out = sys.argv[1], Path(sys.argv[2])
requests = json.loads((out / "requests.json").read_text())
images = mlflow.pyfunc.load_model(model_dir).predict(pd.DataFrame(requests))
np.save(out / "images.npy", images)
import vdvae_dist  # noqa: E402  (already imported by the model: from where?)

(out / "where.json").write_text(json.dumps({"vdvae_dist": vdvae_dist.__file__}))
