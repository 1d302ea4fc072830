"""Write Fashion-MNIST's test images as a folder of PNGs, for ``run.py --far-ood``.

    python experiments/make_fashion_mnist.py data/fashion-mnist

The images come from Debian's ``dataset-fashion-mnist`` package: read where it is installed
(``/usr/share/datasets/fashion-mnist``), else downloaded with ``apt-get download`` (a package
registry, reachable where the internet is not) and unpacked here. Clothes and shoes in grey,
28x28: images of no CIFAR class, for the far-away figures of a run.
"""

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

INSTALLED = "/usr/share/datasets/fashion-mnist"
IMAGES = "t10k-images-idx3-ubyte.gz"


def read_idx_images(path):
    """The ``(N, rows, cols)`` uint8 images of an IDX3 file (the MNIST format)."""
    with gzip.open(path) as f:
        data = f.read()
    magic, count, rows, cols = np.frombuffer(data[:16], ">i4")
    if magic != 2051:
        raise ValueError(f"{path} is not an IDX3 image file (magic {magic})")
    return np.frombuffer(data[16:], np.uint8).reshape(count, rows, cols)


def package_images(workdir):
    """The test images' IDX file: installed, or from the downloaded package."""
    if os.path.exists(os.path.join(INSTALLED, IMAGES)):
        return os.path.join(INSTALLED, IMAGES)
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        sys.exit("make_fashion_mnist.py: needs apt-get and dpkg-deb (Debian's "
                 "dataset-fashion-mnist package); install the package or run on Debian")
    subprocess.run(["apt-get", "download", "dataset-fashion-mnist"], cwd=workdir, check=True,
                   capture_output=True)
    (deb,) = [name for name in os.listdir(workdir) if name.endswith(".deb")]
    subprocess.run(["dpkg-deb", "-x", deb, "unpacked"], cwd=workdir, check=True)
    return os.path.join(workdir, "unpacked", INSTALLED.lstrip("/"), IMAGES)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="the folder to write (one PNG per image)")
    parser.add_argument("--limit", type=int, default=2000, help="images to write")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        images = read_idx_images(package_images(workdir))[:args.limit]
    os.makedirs(args.output, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(args.output, f"{i:05d}.png"))
    print(f"wrote {len(images)} Fashion-MNIST test images to {args.output}")


if __name__ == "__main__":
    main()
