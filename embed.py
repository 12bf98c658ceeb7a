r"""Write the frozen image encoder's embeddings of built splits to an on-disk cache.

  python embed.py --config configs/sameo.py:vitt --config.init_checkpoint=WEIGHTS \
      --config.data.sources="('d2sa',)" --config.data.data_dir=data --out DIR [--split train]

Every source of config.data.sources is encoded for each --split (default: the config's
training split) by the model config.init_checkpoint gives, and stored as bfloat16 in DIR
(`sameo_jax/data/embedding_store.py`). Running the command again finishes an interrupted
cache; a cache made with other weights or preprocessing is refused. Several processes (or
hosts) each run the same command plus --config.distributed=True and its settings, and each
writes its own share of the shards:
  python embed.py ... --config.distributed=True --config.coordinator_address=HOST:PORT \
      --config.num_processes=P --config.process_id=I
Training reads the cache with --config.data.embedding_cache_dir=DIR.
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from sameo_jax import distributed
from sameo_jax.cli import parse_flags
from sameo_jax.data import embedding_store
from sameo_jax.training.embed import write_embeddings
from sameo_jax.training.loop import build_model_config, initial_params, initialize_distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/sameo.py:vitt.", lock_config=True
)
_OUT = flags.DEFINE_string("out", None, "Folder of the embedding cache (created or resumed).")
_SPLITS = flags.DEFINE_multi_string("split", None,
                                    "Split to encode (repeatable; default: the config's "
                                    "training split).")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 64, "Examples per shard file (new caches).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per encoder call.")
flags.mark_flags_as_required(["config", "out"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    config = _CONFIG.value
    try:
        if not config.init_checkpoint:
            raise ValueError("config.init_checkpoint is not set: give the weights whose image "
                             "encoder to cache (official .pt/.npz, a converted directory or a "
                             "training workdir)")
        initialize_distributed(config)
        model_cfg = build_model_config(config)
        params = initial_params(config, model_cfg)
        write_embeddings(config, model_cfg, params, _OUT.value,
                         _SPLITS.value or [config.data.train_split],
                         shard_size=_SHARD_SIZE.value, batch_size=_BATCH_SIZE.value)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("embed.py: all shards written")
        if distributed.is_primary():
            print("\n".join(embedding_store.summary(_OUT.value)))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit("error: " + " ".join(str(e).split())) from None


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
