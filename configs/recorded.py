"""The config a run recorded in its workdir, as the base for overrides.

  python -m s4jax.main --config=configs/recorded.py:runs/x --workdir=runs/x --mode=eval \
      --config.eval.mode=sliding --config.eval.window=96

A run started with many `--config.*` overrides (benchmarks/ablate.py's `--set` and `--run`
values, say) is evaluated again, or resumed, without repeating them: everything comes from
`runs/x/config.json`, and only the overrides given here change it. `--mode=eval` still refuses
a change outside the evaluation keys (`eval.*`, `data.val_list`, `data.num_val`,
`losses.affinity.refine_eval`), and training still refuses any change that is not
operational, so this cannot turn one run into another. `--mode=eval` without `--config`
does the same with no overrides.
"""

from s4jax import workdir as workdir_lib
from s4jax.errors import UserInputError


def get_config(workdir: str | None = None):
  if not workdir:
    # Not a ValueError: config_flags would rewrap that with its traceback in the message.
    raise UserInputError(
      "configs/recorded.py needs the run's workdir after a colon: "
      "--config=configs/recorded.py:runs/x"
    )
  return workdir_lib.recorded_config(workdir)
