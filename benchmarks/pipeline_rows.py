"""Input-pipeline rows of `benchmarks/run.py --pipeline`, on data the benchmark makes itself.

    python benchmarks/run.py --pipeline [--json OUT.json] [--pipeline_images 200] [--workers N]
    python benchmarks/pipeline_rows.py [--json OUT.json] [--images 200] [--workers N]

Data: `write_coco_release` makes a COCO-format instance release of photo-like scenes (640 x 480
JPEGs at quality 90, 8 instances each: textured ellipses over a smooth background with mild
noise, later objects in front; modal masks as RLE).

Rows:
- `amodal_lvis_build`: the command `python -m datasets.build amodal_lvis/coco --workers N`
  (default N: all cores) on that release. `cpu_ms_per_example` = user + system CPU time of
  the command and its worker processes, start to exit / examples written;
  `bytes_per_example` = the split's array_record files / examples written; `seconds` = the
  command's wall time with all workers.
- `pipeline_encoder_path`, `pipeline_cached_path`: the training loader
  (`sameo_jax.data.pipeline.make_train_loader`: batch 8, 1024 px, masks 256, 4 instances per
  image; --workers N worker processes, default all cores) over the same scenes built as a
  D2SA-layout train split (`write_d2sa_release`, `python -m datasets.build d2sa`), giving
  batches for the step that runs the frozen encoder, or for the step that reads cached
  embeddings (an on-disk cache of random bfloat16 [64, 64, 256] embeddings, written by the
  benchmark). `images_per_second_per_core` = images delivered / CPU seconds of the loader
  process and its workers over the second pass of the images (the first starts the workers
  and checks the cache files);
  `images_per_second` = the same images / wall seconds; `load_average` = the machine's
  1-minute load when the timing starts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for datasets/

IMAGE_HW = (480, 640)
INSTANCES = 8
JPEG_QUALITY = 90


def make_scene(rng: np.random.Generator, hw: tuple[int, int] = IMAGE_HW,
               instances: int = INSTANCES) -> tuple[np.ndarray, np.ndarray]:
    """A photo-like scene: ([H, W, 3] uint8 image, [N, H, W] bool amodal masks in paint order,
    later ones in front)."""
    h, w = hw
    low = rng.normal(0.0, 1.0, (h // 32 + 2, w // 32 + 2, 3))
    low = ((low - low.min()) / np.ptp(low) * 255).astype(np.uint8)
    image = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), np.float32)
    image += rng.normal(0.0, 1.5, image.shape)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    masks = np.zeros((instances, h, w), bool)
    for k in range(instances):
        ry, rx = rng.uniform(18, 70, 2)
        cy, cx = rng.uniform(ry, h - ry), rng.uniform(rx, w - rx)
        angle = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        masks[k] = (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
        stripes = 25.0 * np.sin(u / rng.uniform(3.0, 12.0))
        colour = rng.uniform(30, 225, 3)
        image[masks[k]] = colour + stripes[masks[k], None] + rng.normal(0, 3.0, (masks[k].sum(), 3))
    return np.clip(image, 0, 255).astype(np.uint8), masks


def visible_masks(amodal: np.ndarray) -> np.ndarray:
    """[N, H, W] amodal masks in paint order -> visible masks (what later objects leave)."""
    visible = amodal.copy()
    front = np.zeros(amodal.shape[1:], bool)
    for k in range(len(amodal) - 1, -1, -1):
        visible[k] &= ~front
        front |= amodal[k]
    return visible


def write_coco_release(root: pathlib.Path, num_images: int, seed: int = 0,
                       split_dir: str = "val2017") -> pathlib.Path:
    """COCO 2017 layout under root: annotations/instances_<split>.json + <split>/*.jpg (modal
    masks as RLE). Returns the annotation file."""
    from sameo_jax.boxes import box_from_mask, xyxy_to_xywh
    from sameo_jax.masks import encode_rle

    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split_dir).mkdir(exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        image, amodal = make_scene(rng)
        name = f"{i + 1:012d}.jpg"
        Image.fromarray(image).save(root / split_dir / name, quality=JPEG_QUALITY)
        images.append({"id": i + 1, "file_name": name, "height": image.shape[0],
                       "width": image.shape[1]})
        for k, mask in enumerate(visible_masks(amodal)):
            if not mask.any():
                continue
            rle = encode_rle(mask)
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": 1 + k % 4,
                "segmentation": rle, "area": int(mask.sum()), "iscrowd": 0,
                "bbox": xyxy_to_xywh(box_from_mask(mask)[None])[0].tolist()})
    path = root / "annotations" / f"instances_{split_dir}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 5)]}))
    return path


def amodal_lvis_build(num_images: int, workers: int | None, work_dir: pathlib.Path,
                      ) -> dict[str, Any]:
    """The `amodal_lvis_build` row (see the module docstring)."""
    from datasets.amodal_lvis.amodal_lvis_dataset_builder import default_workers

    manual, data = work_dir / "manual", work_dir / "data"
    write_coco_release(manual, num_images)
    source_bytes = sum(p.stat().st_size for p in (manual / "val2017").iterdir())
    used = workers or default_workers()
    command = [sys.executable, "-m", "datasets.build", "amodal_lvis/coco", "--manual_dir",
               str(manual), "--data_dir", str(data), "--split", "validation",
               "--workers", str(used)]
    before, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - wall
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    info = json.loads(next(data.rglob("dataset_info.json")).read_text())
    examples = sum(int(n) for split in info["splits"] for n in split["shardLengths"])
    stored = sum(p.stat().st_size for p in data.rglob("*.array_record*"))
    return {
        "name": "amodal_lvis_build", "cpu_ms_per_example": 1e3 * cpu / examples,
        "bytes_per_example": stored / examples, "seconds": wall, "examples": examples,
        "source_images": num_images, "source_jpeg_bytes_per_image": source_bytes / num_images,
        "workers": used, "device": "cpu",
        "note": f"{num_images} JPEGs 640x480, {INSTANCES} instances each; {used} workers",
    }


def write_d2sa_release(root: pathlib.Path, num_images: int, seed: int = 0) -> pathlib.Path:
    """D2SA layout under root: D2S_amodal_training_rot0.json (COCO-style amodal records:
    amodal and visible masks as RLE, bbox, occlude_rate) + images/*.jpg. Returns the file."""
    from sameo_jax.boxes import box_from_mask, xyxy_to_xywh
    from sameo_jax.masks import encode_rle

    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        image, amodal = make_scene(np.random.default_rng([seed, i]))
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(image).save(root / "images" / name, quality=JPEG_QUALITY)
        images.append({"id": i + 1, "file_name": name, "height": image.shape[0],
                       "width": image.shape[1]})
        for k, (full, seen) in enumerate(zip(amodal, visible_masks(amodal), strict=True)):
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": 1 + k % 4,
                "segmentation": encode_rle(full), "visible_mask": encode_rle(seen),
                "occlude_rate": float(1 - seen.sum() / full.sum()), "iscrowd": 0,
                "bbox": xyxy_to_xywh(box_from_mask(full)[None])[0].tolist()})
    path = root / "D2S_amodal_training_rot0.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 5)]}))
    return path


def _process_tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live descendants (the workers)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


LOADER = dict(batch_size=8, image_size=1024, mask_size=256, instances_per_image=4)
EMBEDDING_SHAPE = (64, 64, 256)  # ViT-T / ViT-S at 1024 px


def write_synthetic_cache(folder: pathlib.Path, name: str, split: str, source: Any) -> Any:
    """An embedding cache of random bfloat16 embeddings for every example of `source` (what
    the loader reads costs the same whatever the values); returns its reader."""
    from sameo_jax.data import embedding_store

    store = embedding_store.EmbeddingStore.create(
        folder, {"note": "random embeddings for the loader benchmark"}, EMBEDDING_SHAPE)
    writer = store.writer(name, split, len(source), 64, repr(source))
    rng = np.random.default_rng(0)
    for k in writer.pending():
        indices = writer.shard_examples(k)
        values = rng.standard_normal((len(indices), *EMBEDDING_SHAPE), np.float32)
        writer.write(k, values, [source.record(i).image_id for i in indices])
    return store.reader(name, split, repr(source))


def _loader_row(name: str, cached: bool, num_images: int, workers: int | None,
                work_dir: pathlib.Path) -> dict[str, Any]:
    """A `pipeline_*_path` row: the training loader over a built D2SA-layout split, images
    per CPU-second of the loader process and its workers over the second pass."""
    from datasets import build
    from sameo_jax.data import pipeline, sources

    manual, data = work_dir / "manual", work_dir / "data"
    write_d2sa_release(manual, num_images)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        build.main(["d2sa", "--manual_dir", str(manual), "--data_dir", str(data),
                    "--split", "train"])
    source = sources.open_source("d2sa", "train", str(data))
    used = os.cpu_count() if workers is None else workers
    size = LOADER["image_size"]
    if cached:
        reader = write_synthetic_cache(work_dir / "cache", "d2sa", "train", source)
        inputs = {"embeddings": {"d2sa": reader}}
    else:
        inputs = {"image_pad_hw": (size, size)}
    loader = pipeline.make_train_loader({"d2sa": source}, seed=0, worker_count=used,
                                        **inputs, **LOADER)
    batches = max(num_images // LOADER["batch_size"], 1)
    for _ in range(batches):  # the first pass: workers start, cache shards are checked
        next(loader)
    cpu, wall = _process_tree_cpu_seconds(), time.perf_counter()
    load = os.getloadavg()[0]
    for _ in range(batches):
        next(loader)
    cpu, wall = _process_tree_cpu_seconds() - cpu, time.perf_counter() - wall
    loader.close()
    images = batches * LOADER["batch_size"]
    return {
        "name": name, "images_per_second_per_core": images / cpu,
        "images_per_second": images / wall, "cpu_seconds": cpu, "seconds": wall,
        "images": images, "workers": used, "cores": os.cpu_count(),
        "load_average": load, "device": "cpu",
        "note": (f"{num_images} JPEGs 640x480, {INSTANCES} instances, batch "
                 f"{LOADER['batch_size']}, {size} px, masks {LOADER['mask_size']}, "
                 f"{LOADER['instances_per_image']} instances per image; {used} workers; "
                 + ("random bfloat16 embeddings from an on-disk cache, no image decoded"
                    if cached else "uint8 images padded to the model frame for the step")),
    }


def pipeline_encoder_path(num_images: int, workers: int | None, work_dir: pathlib.Path
                          ) -> dict[str, Any]:
    """`pipeline_encoder_path`: batches for the step that runs the frozen encoder."""
    return _loader_row("pipeline_encoder_path", False, num_images, workers, work_dir)


def pipeline_cached_path(num_images: int, workers: int | None, work_dir: pathlib.Path
                         ) -> dict[str, Any]:
    """`pipeline_cached_path`: batches for the step that reads cached embeddings."""
    return _loader_row("pipeline_cached_path", True, num_images, workers, work_dir)


ROWS = {"amodal_lvis_build": amodal_lvis_build, "pipeline_encoder_path": pipeline_encoder_path,
        "pipeline_cached_path": pipeline_cached_path}


def run(names: list[str] | None = None, *, images: int = 200, workers: int | None = None,
        ) -> list[dict[str, Any]]:
    """Runs the named rows (default: all) and prints one line per row."""
    rows = []
    for name in names or list(ROWS):
        with tempfile.TemporaryDirectory() as tmp:
            row = ROWS[name](images, workers, pathlib.Path(tmp))
        rows.append(row)
        if "images_per_second_per_core" in row:
            print(f"{name:<22} {row['images_per_second_per_core']:7.1f} images/CPU-s "
                  f"{row['images_per_second']:7.1f} images/s wall ({row['images']} images, "
                  f"{row['workers']} workers, {row['cores']} cores, load average "
                  f"{row['load_average']:.1f})", flush=True)
            continue
        print(f"{name:<22} {row['cpu_ms_per_example']:7.1f} CPU-ms/example "
              f"{row['bytes_per_example'] / 1e3:7.1f} KB/example {row['seconds']:7.1f} s wall "
              f"({row['examples']} examples from {row['source_images']} images, "
              f"JPEGs {row['source_jpeg_bytes_per_image'] / 1e3:.1f} KB, "
              f"{row['workers']} workers)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", action="append", choices=sorted(ROWS),
                        help="run only this row (repeatable)")
    parser.add_argument("--images", type=int, default=200, help="source images to generate")
    parser.add_argument("--workers", type=int, default=None,
                        help="build worker processes (default: all cores)")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = run(args.rows, images=args.images, workers=args.workers)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
