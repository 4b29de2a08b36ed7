"""DeepSpeed ZeRO 1/2/3 on 2 CPU ranks (gloo): gradient skipping, EMA, checkpoints."""
import json

import pytest
import torch.multiprocessing as mp

from tests.conftest import free_port
from tests.integration.ds_worker import skip_and_ema

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_skips_nan_and_above_threshold_identically_on_every_rank(stage, tmp_path):
    mp.spawn(skip_and_ema, args=(2, stage, free_port(), str(tmp_path)), nprocs=2)
    logs = [json.loads((tmp_path / f"log-{r}.json").read_text()) for r in range(2)]
    for log in logs:
        assert log["skipped"] == [False, True, True, False]
        assert log["unchanged"] == [True, True]  # weights, optimizer state and EMA untouched
        assert log["ema_lerp"] is True
        assert log["counters"] == [4, 2, 2]
        assert log["restored"] == [True] * 5
        assert log["norms"][1] in ("nan", float("inf"))  # non-finite (stage 3 reports inf)
        assert 1000 <= log["norms"][2] < float("inf")  # the true pre-clip norm, above the threshold
    assert logs[0]["norms"] == logs[1]["norms"]  # one global norm, one decision
    assert (tmp_path / "ema_fp32.pt").exists()
