r"""The official EfficientSAM weights: where they are published, and a download with a
progress bar.

The official repository (github.com/yformer/EfficientSAM) keeps them in its `weights/` folder:
`efficient_sam_vitt.pt` (ViT-T) and `efficient_sam_vits.pt.zip` (ViT-S, zipped to stay under
GitHub's file size limit). Both are read as they are by `sameo_jax.model_io`.

  python -m sameo_jax.weights vitt weights        # -> weights/efficient_sam_vitt.pt
  python -m sameo_jax.weights vits weights        # -> weights/efficient_sam_vits.pt.zip
  python -m sameo_jax.model_io weights/efficient_sam_vitt.pt ckpt_vitt   # optional

Without internet: download the file on another machine and copy it here; every command
that takes a checkpoint accepts the file itself.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import urllib.error
import urllib.request

from tqdm import tqdm

OFFICIAL_REPOSITORY = "https://github.com/yformer/EfficientSAM"
OFFICIAL_WEIGHTS = {
    "vitt": f"{OFFICIAL_REPOSITORY}/raw/main/weights/efficient_sam_vitt.pt",
    "vits": f"{OFFICIAL_REPOSITORY}/raw/main/weights/efficient_sam_vits.pt.zip",
}
# The official example photo (603 x 1072), for trying a model out.
SAMPLE_IMAGE = f"{OFFICIAL_REPOSITORY}/raw/main/figs/examples/dogs.jpg"
_CHUNK = 1 << 20


def file_name(url: str) -> str:
    """The last part of a URL's path: 'efficient_sam_vitt.pt'."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def download(url: str, path: str | os.PathLike, *, progress: bool = True,
             timeout_s: float = 60.0) -> pathlib.Path:
    """Downloads `url` to `path` with a progress bar; an existing file is kept as it is.

    The data goes to `path` + '.part' first and is renamed when complete, so an interrupted
    download never leaves a truncated file under the final name. Raises OSError with one line
    naming the URL (and what to do without internet) when the download fails.
    """
    path = pathlib.Path(path)
    if path.exists():
        print(f"{path} exists; using it")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=path.name, disable=not progress) as bar:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
        if total is not None and part.stat().st_size != total:
            raise OSError(f"got {part.stat().st_size} of {total} bytes")
    except (OSError, urllib.error.URLError, ValueError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise OSError(f"cannot download {url} ({reason}); without internet, download it "
                      f"elsewhere and copy it to {path}") from None
    shutil.move(part, path)
    return path


def official_weights(variant: str, folder: str | os.PathLike = "weights", *,
                     progress: bool = True) -> pathlib.Path:
    """The official checkpoint of `variant` ('vitt' or 'vits') in `folder`, downloaded when
    it is not there yet. Returns its path."""
    if variant not in OFFICIAL_WEIGHTS:
        raise ValueError(f"no official weights for variant {variant!r}; choose one of "
                         f"{', '.join(OFFICIAL_WEIGHTS)}")
    url = OFFICIAL_WEIGHTS[variant]
    return download(url, pathlib.Path(folder) / file_name(url), progress=progress)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=sorted(OFFICIAL_WEIGHTS),
                        help="vitt: EfficientSAM ViT-T; vits: EfficientSAM ViT-S")
    parser.add_argument("folder", nargs="?", default="weights",
                        help="where to put the file (default: weights)")
    args = parser.parse_args(argv)
    try:
        path = official_weights(args.variant, args.folder)
    except OSError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"{path}: use it as --checkpoint / --config.init_checkpoint, or convert it once "
          f"with: python -m sameo_jax.model_io {path} ckpt_{args.variant}")


if __name__ == "__main__":
    main()
