"""
Title: An ArcFace head on your own backbone
Author: the tfmargin authors
Date created: 2026-11-28
Last modified: 2026-12-01
Description: Train a small CNN with an additive angular margin, look at its embeddings in
TensorBoard's projector, and export it for serving.
Accelerator: none needed (a CPU trains it in about a minute)

    python examples/arcface_own_backbone.py path/to/images [output_dir]

`path/to/images` holds one sub-folder of images per class, or `train/` and `test/` folders
of them (then `train/` is read). Set EPOCHS to train longer.
"""

import os
import sys

import keras
import numpy as np
import tensorflow as tf

from tfmargin import MarginClassifier
from tfmargin.projector import EmbeddingProjector

data_dir = sys.argv[1]
out_dir = sys.argv[2] if len(sys.argv) > 2 else "example_output"
epochs = int(os.environ.get("EPOCHS", 10))

"""
## Data

Keras reads the folder; a fifth of it is held out to watch training. Images are 64x64 here:
any square size your backbone accepts works.
"""
if os.path.isdir(os.path.join(data_dir, "train")):  # train/ and test/: train on train/
    data_dir = os.path.join(data_dir, "train")
train_ds, val_ds = keras.utils.image_dataset_from_directory(
    data_dir, validation_split=0.2, subset="both", seed=0, image_size=(64, 64), batch_size=16)
class_names = train_ds.class_names

# The model normalises its inputs itself, with statistics of the training images, so the
# exported model takes raw pixels.
pixels = np.concatenate([images.numpy().reshape(-1, 3) for images, _ in train_ds])
mean, variance = pixels.mean(axis=0), pixels.var(axis=0)

"""
## Your backbone, an ArcFace head

Any Keras model from images to a feature map or a vector will do: a keras.applications
model, a KerasHub backbone, or this small CNN.
"""
backbone = keras.Sequential([
    keras.Input((64, 64, 3)),
    keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
    keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu"),
    keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu"),
], name="my_cnn")

# ArcFace: the target class's logit is s * cos(theta + m). The margin acts only in the
# training loss: `fit` takes plain (image, label) pairs and `predict` never needs a label.
model = MarginClassifier(backbone, num_classes=len(class_names), margin_type="arcface",
                         margin=0.3, scale=8.0, embedding_dim=32, mean=mean, variance=variance)
model.compile(keras.optimizers.Adam(1e-3), metrics=["accuracy"])

"""
## Train, with the embeddings in TensorBoard

The projector callback writes the L2-normalised embeddings of held-out images together
with the class centres: `tensorboard --logdir output_dir/logs`, then the Projector tab.
"""
projector = EmbeddingProjector(os.path.join(out_dir, "logs", "projector"), model,
                               val_ds.unbatch(), class_names, num_samples=100)
model.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=2,
          callbacks=[keras.callbacks.TensorBoard(os.path.join(out_dir, "logs")), projector])
# A short fit leaves BatchNorm's moving statistics behind (the neck has one): recompute them.
model.recalibrate_batchnorm(train_ds.map(lambda images, labels: images))
projector.write(epochs)
# The head's theta_y metric: the mean angle between an embedding and its class centre.
print(model.evaluate(val_ds, return_dict=True, verbose=0))

"""
## Export and serve

`model.export` writes a TensorFlow SavedModel of the label-free model: images in, logits
`s * cos(theta_j)` out. Plain TensorFlow loads it; no tfmargin needed.
"""
model.export(os.path.join(out_dir, "saved_model"), verbose=False)
served = tf.saved_model.load(os.path.join(out_dir, "saved_model"))
images, labels = next(iter(val_ds))
predicted = np.argmax(served.serve(images).numpy(), axis=1)
print("served:", [class_names[i] for i in predicted[:8]])
print("true:  ", [class_names[i] for i in labels.numpy()[:8]])
