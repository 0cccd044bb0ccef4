"""The same loop trains Hawk and the MQA baseline (Griffin is covered by test_train_loop.py)."""

import numpy as np
import pytest

from recurrentgemma_tpu import experiment as experiment_lib
from recurrentgemma_tpu import metrics as metrics_lib
from recurrentgemma_tpu import trainer
from test_train_common import small_config


@pytest.mark.slow  # over ~30 s on 2 cores: the slow tier (.ci/run)
@pytest.mark.parametrize("family", ["hawk", "mqa"])
def test_family_trains_and_evaluates(family, tmp_path):
  config = small_config(model__block_pattern=family, train__steps=8, checkpoint__save_every=0,
                        optimizer__learning_rate=3e-3)
  result = trainer.train_and_evaluate(experiment_lib.build(config), str(tmp_path))
  assert result.status == "completed" and result.step == 8
  losses = [r["loss"] for r in metrics_lib.read_metrics(str(tmp_path))]
  assert len(losses) == 8 and losses[-1] < losses[0] - 0.5, losses
  # Untrained, the loss is about log(vocab) = 6.93 nats; the final evaluation must be below it.
  assert np.isfinite(result.eval["loss"]) and result.eval["loss"] < np.log(1024) - 0.3
