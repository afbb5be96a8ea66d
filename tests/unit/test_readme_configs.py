"""Every JSON example in the README parses as a zerotrain config (and resolves at dp = 2)."""
import json
import os
import re

import pytest

from zerotrain.config import load_config

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
BLOCKS = re.findall(r"```json\n(.*?)```", open(README).read(), flags=re.S)


def test_readme_has_config_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_config_parses(i):
    cfg = load_config(json.loads(BLOCKS[i]))
    batch = cfg.resolve(2)
    assert batch.train_batch_size == batch.train_micro_batch_size_per_gpu * batch.gradient_accumulation_steps * 2
