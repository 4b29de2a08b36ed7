import os

import pytest
import torch

# 2-core machines: keep torch from oversubscribing when pytest runs beside other work
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def seeded():
    torch.manual_seed(0)
