r"""SAMEO training: fine-tune EfficientSAM's mask decoder on amodal masks.

Variants (the part after the colon):

  vitt  EfficientSAM ViT-T from a converted official checkpoint; only the mask decoder trains.
  vits  the same with ViT-S.
  vitt_cpu, vits_cpu  the same for a CPU run under ./cpu.sh (malloc keeps freed memory): the
        encoder's attention in the bigger query chunks that pay there.
  demo  a tiny model trained from scratch on the embedded procedural data set (no download):
        finishes on a 2-core CPU in a few minutes.

vitt and vits need --config.init_checkpoint (they stop at once with an error otherwise);
--config.init_checkpoint=random is the explicit request for random weights.

Commands:

  python train.py --config configs/sameo.py:demo --workdir workdir_demo
  python train.py --config configs/sameo.py:vitt --workdir workdir_vitt \
      --config.init_checkpoint=weights/efficient_sam_vitt.pt \
      --config.data.sources="('cocoa', 'kins')" --config.data.data_dir=data
  python train.py --config configs/sameo.py:vitt --workdir workdir_vitt --config.lr=1e-4

Running a command again with the same --workdir resumes from its latest checkpoint, on any
number of devices or processes. Several processes (one per host, or several on one machine)
each run the same command plus
  --config.distributed=True --config.coordinator_address=HOST:PORT \
  --config.num_processes=P --config.process_id=I
(on TPU pods and SLURM, --config.distributed=True alone: JAX detects the rest).
A key that does not exist (a typo) is an error. `trainable` holds regular expressions matched
against the start of each parameter's '/'-joined path ('mask_decoder/iou_head/...').
"""

from __future__ import annotations

import ml_collections

# Encoder attention queries per chunk under ./cpu.sh: the largest power of two whose logits
# fit 48 MiB per image (without kept memory their fresh pages cost more than they save).
CPU_ENCODER_CHUNKS = {"vitt": 1024, "vits": 512}
VARIANTS = ("vitt", "vits", "demo", "vitt_cpu", "vits_cpu")


def get_config(arg: str = "vitt") -> ml_collections.ConfigDict:
    """The training config of a variant: 'vitt', 'vits', 'demo', 'vitt_cpu' or 'vits_cpu'."""
    if arg not in VARIANTS:
        raise ValueError(f"unknown config variant {arg!r}; choose one of {', '.join(VARIANTS)}")
    cpu = arg.endswith("_cpu")
    arg = arg.removesuffix("_cpu")
    c = ml_collections.ConfigDict()

    # Model: a named variant of sameo_jax.models.config, plus field overrides.
    c.model = ml_collections.ConfigDict()
    c.model.variant = arg if arg != "demo" else "tiny"
    c.model.overrides = ml_collections.ConfigDict()
    # Official EfficientSAM weights (.pt/.npz), a converted orbax directory or a training
    # workdir. Required (unless the workdir resumes); 'random' asks for random weights.
    c.init_checkpoint = ""
    # What learns (SAMEO: the mask decoder only; the image and prompt encoders stay frozen).
    c.trainable = ("mask_decoder/",)

    # Data: the data sets to train on (built TFDS data sets under data_dir, or 'demo': the
    # procedural one, no build needed), how they mix, and where they live ('' = default).
    c.data = ml_collections.ConfigDict()
    c.data.sources = ("demo",)
    c.data.mixture = "log_proportional"  # log_proportional | proportional | uniform
    c.data.mixture_weights = ()  # explicit weights, one per source (overrides `mixture`)
    c.data.data_dir = ""
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.eval_examples = 0  # evaluate on the first this many examples (0: all)
    c.data.demo_train_examples = 2000  # size of the procedural data set's splits
    c.data.demo_eval_examples = 200
    # Scene parameters of the procedural data set (see sameo_jax.data.demo_scenes.DemoSource):
    # rendered size in pixels, hidden fraction of each occluded object, an object's longer
    # side as a fraction of the image, and whether each occluded scene has its unoccluded twin.
    c.data.demo_image_size = 256
    c.data.demo_occlusion_range = (0.15, 0.6)
    c.data.demo_object_size = (0.24, 0.38)
    c.data.demo_dual = True
    c.data.num_workers = -1  # grain worker processes (0: in the main process; < 0: the cores)
    # embed.py's output folder: the frozen encoder's embeddings read from disk instead of
    # computed in the step (training sources must all be in it; evaluation uses it where it
    # holds the split). '' : the encoder runs in the step (or see cache_embeddings).
    c.data.embedding_cache_dir = ""
    # (height, width) images are zero-padded to before the jitted step resizes them to the
    # model frame; () is the model frame itself. A larger image is resized on the host.
    c.data.image_pad_hw = ()

    # Prompts and targets.
    c.prompt_mode = "random"  # random: modal or amodal box with p=0.5 | modal | amodal
    c.eval_prompt_mode = "modal"  # boxes a modal detector would give
    c.box_jitter = 0.0  # box-noise std as a fraction of the box side (0: off; SAM uses 0.1)
    c.target = "amodal"  # amodal (SAMEO) | modal (visible masks: the modal baseline)
    c.instances_per_image = 4  # padded with invalid instances that contribute nothing
    c.mask_selection = "min_loss"  # min_loss (SAM) | first | single

    # Loss: dice + focal + 0.05 * L1(predicted IoU, true IoU).
    c.loss = ml_collections.ConfigDict()
    c.loss.dice_weight = 1.0
    c.loss.focal_weight = 1.0
    c.loss.iou_weight = 0.05
    c.loss.focal_alpha = 0.25  # < 0 disables the alpha weighting
    c.loss.focal_gamma = 2.0

    # Optimisation.
    c.total_steps = 20_000
    c.batch_size = 32  # images per step (global, over all devices); must divide by devices
    c.lr = 1e-4
    c.lr_schedule = "cosine"  # cosine | constant
    c.warmup_steps = 500
    c.weight_decay = 1e-4
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.grad_clip_norm = 1.0  # 0 disables
    # The train step recomputes the decoder's per-prompt maps in its backward pass under this
    # jax.checkpoint policy (models/config.py REMAT_POLICIES; '' keeps them all in memory).
    c.decoder_remat = "nothing_saveable"
    c.seed = 0
    # Encode each image once and keep its embedding in host memory for reuse (needs a frozen
    # image encoder; for small sets: the on-disk data.embedding_cache_dir scales).
    c.cache_embeddings = False

    # Bookkeeping.
    c.log_every = 50
    c.checkpoint_every = 1000
    c.max_to_keep = 3
    c.eval_every = 1000  # 0: evaluate only at the end; < 0: never
    c.eval_occluded_min = 0.1  # an instance counts as occluded from this occlusion rate
    c.progress_bar = True
    c.async_checkpoints = True

    # Several processes (hosts): start jax.distributed first. Unset coordinator_address,
    # num_processes and process_id are left to JAX's cluster auto-detection (TPU pods, SLURM).
    c.distributed = False
    c.coordinator_address = ""  # HOST:PORT of process 0's coordinator
    c.num_processes = ml_collections.config_dict.placeholder(int)
    c.process_id = ml_collections.config_dict.placeholder(int)

    if arg == "demo":
        # Random encoders carry no knowledge, so with no pretrained checkpoint everything
        # trains; give --config.init_checkpoint and --config.trainable="('mask_decoder/',)"
        # to run the SAMEO recipe (decoder-only) instead.
        c.init_checkpoint = "random"
        c.trainable = (".*",)
        c.data.num_workers = 0  # the scenes cost little to draw; the CPU step needs the cores
        c.model.overrides.img_size = 128
        # Scenes rendered at the model's input size, objects large enough to keep their
        # shape at the 32 x 32 mask size, and heavy occlusion (30-70% hidden), so that
        # amodal completion matters; a fresh image for (nearly) every training example.
        c.data.demo_image_size = 128
        c.data.demo_object_size = (0.3, 0.45)
        c.data.demo_occlusion_range = (0.3, 0.7)
        c.data.demo_train_examples = 8192
        c.data.demo_eval_examples = 256
        c.total_steps = 1000
        c.batch_size = 8
        c.lr = 1e-3
        c.warmup_steps = 30
        c.weight_decay = 0.0
        c.log_every = 20
        c.checkpoint_every = 200
        c.eval_every = 200
    if cpu:
        c.model.overrides.encoder_attention_chunk = CPU_ENCODER_CHUNKS[arg]
    return c
