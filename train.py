r"""Train SAMEO. All logic lives in `sameo_jax.training.loop.train_and_evaluate`.

Config variants (configs/sameo.py:VARIANT): demo (tiny model from scratch on the procedural
scenes, a few minutes on a CPU); vitt, vits (EfficientSAM ViT-T / ViT-S from official weights,
only the mask decoder trains); vitt_cpu, vits_cpu (the same for a CPU, run under ./cpu.sh).

  python train.py --config configs/sameo.py:demo --workdir workdir_demo
  python train.py --config configs/sameo.py:vitt --workdir DIR --config.init_checkpoint=PATH
  python train.py --config configs/sameo.py:demo --workdir DIR --config.lr=1e-4

The same --workdir resumes from its latest checkpoint (on any number of devices or
processes). A misspelt --config.key is an error. vitt/vits need --config.init_checkpoint
(or --config.init_checkpoint=random). Several processes each run the same command plus
  --config.distributed=True --config.coordinator_address=HOST:PORT \
  --config.num_processes=P --config.process_id=I
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sameo_jax.cli import parse_flags
from sameo_jax.evaluation.evaluator import SPLITS
from sameo_jax.training.checkpointing import CHECKPOINT_SUBDIR, DamagedCheckpointError
from sameo_jax.training.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/sameo.py:demo.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietCheckpointLibrary(std_logging.Filter):
    """Keeps orbax's per-save INFO chatter (hundreds of lines a run) off the console."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietCheckpointLibrary())
    config = _CONFIG.value
    try:
        state = train_and_evaluate(config, _WORKDIR.value)
    except DamagedCheckpointError as e:
        # Reads orbax abandoned in the damaged files may still end in other threads; nothing
        # is left to write, so exit now rather than let them print at shutdown.
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None
    if jax.process_index() == 0:
        print(next_steps(config, _WORKDIR.value, int(state.step)))


def next_steps(config, workdir: str, step: int) -> str:
    """Where the checkpoint is, and the evaluate.py / predict.py commands that use it."""
    name = next((s for s in config.data.sources if s in SPLITS), "demo")
    data_dir = f" --data_dir {config.data.data_dir}" if config.data.data_dir else ""
    return "\n".join([
        f"checkpoint: {os.path.join(workdir, CHECKPOINT_SUBDIR)} (step {step})",
        "next:",
        f"  python evaluate.py --split {name}{data_dir} --checkpoint {workdir} --visualize 8",
        f"  python predict.py --checkpoint {workdir} --image IMAGE --prompts PROMPTS.json "
        "--overlay out.png",
    ])


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
