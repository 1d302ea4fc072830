"""Write the CIFAR-10 JPEG copy the recorded runs were made on, from TFDS.

    python experiments/make_cifar10_jpeg.py ../data/cifar10-jpeg

One JPEG per image (Pillow, quality 75, 4:2:0 chroma subsampling), in class folders named
as TFDS names the labels (airplane ... truck: the official label order is their
alphabetical order): ``train/<class>/NNNN.jpg`` (5,000 per class) and ``test/<class>/``
(1,000 per class), numbered in TFDS's order. It prints the copy's fingerprint (SHA-256 over
the sorted relative paths and bytes, as every run records it) beside the fingerprint of the
copy the ledger's runs used: JPEG encoders differ between library versions, so equal
fingerprints mean the same bytes, and different ones a copy whose accuracy can differ a
little.
"""

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QUALITY = 75
SUBSAMPLING = 2  # Pillow's 4:2:0


def write_split(split, folder, names):
    """Every image of a TFDS split as ``folder/<class>/NNNN.jpg``; returns the count."""
    import tensorflow_datasets as tfds
    from PIL import Image

    counts = {}
    for image, label in tfds.as_numpy(tfds.load("cifar10", split=split, as_supervised=True)):
        name = names[int(label)]
        index = counts[name] = counts.get(name, -1) + 1
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        Image.fromarray(image).save(os.path.join(folder, name, f"{index:04d}.jpg"),
                                    quality=QUALITY, subsampling=SUBSAMPLING)
    return sum(count + 1 for count in counts.values())


def ledger_fingerprints(ledger):
    """The data fingerprints recorded by the ledger's CIFAR-10 JPEG runs."""
    found = set()
    for path in glob.glob(os.path.join(ledger, "*", "config.json")):
        with open(path) as f:
            config = json.load(f)
        if "cifar10-jpeg" in config.get("dataset", ""):
            found.add(config.get("data_fingerprint"))
    return sorted(f for f in found if f)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="folder to create")
    args = parser.parse_args(argv)
    if os.path.exists(args.output):
        parser.exit(2, f"make_cifar10_jpeg.py: error: {args.output!r} exists; choose a new "
                       "folder\n")
    from tfmargin.quiet import import_tensorflow

    import_tensorflow()
    import tensorflow_datasets as tfds

    from tfmargin.fingerprint import fingerprint_folder

    names = tfds.builder("cifar10").info.features["label"].names
    for split in ("train", "test"):
        count = write_split(split, os.path.join(args.output, split), names)
        print(f"wrote {count} {split} images to {os.path.join(args.output, split)}")
    print(f"fingerprint of this copy:      {fingerprint_folder(args.output, ('.jpg',))}")
    ledger = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "results", "runs")
    for fingerprint in ledger_fingerprints(ledger) or ["(no CIFAR-10 JPEG run recorded)"]:
        print(f"fingerprint of the ledger's:   {fingerprint}")


if __name__ == "__main__":
    main()
