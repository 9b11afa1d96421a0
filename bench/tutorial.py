"""The PyTorch tutorial "Visualizing Models, Data, and Training with TensorBoard" as a plain script.

Our own equivalent of the tutorial's code, with its bugs fixed (`next(iter(...))` for `dataiter.next()`,
one writer, `class_labels`, all four subplots, loss logged and reset every 1000 batches), so that
bench/bench.py can time the tutorial's way of working against the flow's. Prints one JSON line at the end:
{"train_seconds": ..., "test_accuracy": ...}.

    python bench/tutorial.py --data-dir DATA --log-dir runs/tutorial

DATA/FashionMNIST/raw must hold the four official .gz files: torchvision's `download=True` then finds
them md5-valid and only extracts them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # a script without a display; the figures only go to TensorBoard

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from torchvision import transforms  # noqa: E402

from fashion_pipeline.tasks.ml.model import Net  # the tutorial's network, layer for layer  # noqa: E402

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle Boot")
BATCH_SIZE, EPOCHS, LOG_EVERY, EMBEDDING_SIZE = 4, 1, 1000, 100
# The tutorial's loaders use num_workers=2. On 2 cores the two worker processes compete with the training
# process (itself 2 threads) and add a pickle-and-queue round trip per 4-image batch. Measured on an idle
# machine pinned to 2 cores (taskset -c 0,1), two runs each: training 41-53 s with 0 workers, 67-82 s with 2
# (wall 56-67 s against 84-102 s). So the baseline is the tutorial at its fastest here: 0 workers.
# --num-workers 2 gives the tutorial's own setting.
DEFAULT_WORKERS = 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="Folder whose FashionMNIST/raw holds the four .gz files.")
    parser.add_argument("--log-dir", required=True, help="TensorBoard run directory to write.")
    parser.add_argument("--seed", type=int, default=0,
                        help="Seed for the initial weights, the shuffling and the samples.")
    parser.add_argument("--num-workers", type=int, default=DEFAULT_WORKERS, help="DataLoader worker processes.")
    parser.add_argument("--max-batches", type=int, default=None,
                        help="Stop training after this many batches (quick checks).")
    return parser.parse_args(argv)


def load_data(data_dir: str, num_workers: int) -> tuple[torchvision.datasets.FashionMNIST, DataLoader, DataLoader]:
    """The tutorial's datasets and loaders: a PIL image per sample, converted and normalised one at a time."""
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    trainset = torchvision.datasets.FashionMNIST(data_dir, download=True, train=True, transform=transform)
    testset = torchvision.datasets.FashionMNIST(data_dir, download=True, train=False, transform=transform)
    trainloader = DataLoader(trainset, batch_size=BATCH_SIZE, shuffle=True, num_workers=num_workers)
    testloader = DataLoader(testset, batch_size=BATCH_SIZE, shuffle=False, num_workers=num_workers)
    return trainset, trainloader, testloader


def matplotlib_imshow(img: torch.Tensor, one_channel: bool = False) -> None:
    """Show a normalised image on the current axes, as the tutorial does."""
    if one_channel:
        img = img.mean(dim=0)
    img = img / 2 + 0.5  # unnormalise: [-1, 1] -> [0, 1]
    npimg = img.numpy()
    if one_channel:
        plt.imshow(npimg, cmap="Greys")
    else:
        plt.imshow(np.transpose(npimg, (1, 2, 0)))


def images_to_probs(net: nn.Module, images: torch.Tensor) -> tuple[np.ndarray, list[float]]:
    """Predicted classes and their softmax probabilities for a batch."""
    output = net(images)  # (B, 10)
    _, preds_tensor = torch.max(output, 1)
    preds = np.squeeze(preds_tensor.numpy())
    return preds, [F.softmax(el, dim=0)[i].item() for i, el in zip(preds, output)]


def plot_classes_preds(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Figure:
    """The tutorial's "predictions vs. actuals": the four images of a batch with predicted and true class."""
    preds, probs = images_to_probs(net, images)
    fig = plt.figure(figsize=(12, 48))  # the tutorial's size
    for idx in range(len(images)):
        fig.add_subplot(1, len(images), idx + 1, xticks=[], yticks=[])
        matplotlib_imshow(images[idx], one_channel=True)
        plt.title(
            f"{CLASSES[preds[idx]]}, {probs[idx] * 100.0:.1f}%\n(label: {CLASSES[labels[idx]]})",
            color="green" if preds[idx] == labels[idx].item() else "red",
        )
    return fig


def select_n_random(
    data: torch.Tensor, labels: torch.Tensor, n: int = EMBEDDING_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """n random datapoints and their labels."""
    perm = torch.randperm(len(data))
    return data[perm][:n], labels[perm][:n]


def inspect(
    writer: SummaryWriter, net: nn.Module, trainset: torchvision.datasets.FashionMNIST, trainloader: DataLoader
) -> None:
    """Log a grid of one batch, the model's graph, and a projector embedding of 100 training images."""
    images, _ = next(iter(trainloader))  # (4, 1, 28, 28) normalised
    img_grid = torchvision.utils.make_grid(images)
    writer.add_image("four_fashion_mnist_images", img_grid / 2 + 0.5)  # unnormalised, or TensorBoard shows it dark
    writer.add_graph(net, images)
    images, labels = select_n_random(trainset.data, trainset.targets)  # uint8 (100, 28, 28), (100,)
    class_labels = [CLASSES[lab] for lab in labels]
    features = images.view(-1, 28 * 28).float()  # (100, 784)
    writer.add_embedding(features, metadata=class_labels, label_img=images.unsqueeze(1).float() / 255)


def train(net: nn.Module, trainloader: DataLoader, writer: SummaryWriter, max_batches: int | None) -> float:
    """The tutorial's training loop; returns its wall time in seconds."""
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    started = time.perf_counter()
    running_loss = 0.0
    for epoch in range(EPOCHS):
        for i, (inputs, labels) in enumerate(itertools.islice(trainloader, max_batches)):
            optimizer.zero_grad()
            loss = criterion(net(inputs), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            if i % LOG_EVERY == LOG_EVERY - 1:
                step = epoch * len(trainloader) + i
                writer.add_scalar("training loss", running_loss / LOG_EVERY, step)
                writer.add_figure("predictions vs. actuals", plot_classes_preds(net, inputs, labels), global_step=step)
                running_loss = 0.0
    return time.perf_counter() - started


def test_probabilities(net: nn.Module, testloader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities (N, 10) and labels (N,) over the test set."""
    class_probs, class_label = [], []
    with torch.no_grad():
        for images, labels in testloader:
            class_probs.append(F.softmax(net(images), dim=1))  # (B, 10)
            class_label.append(labels)
    return torch.cat(class_probs), torch.cat(class_label)


def add_pr_curves(writer: SummaryWriter, test_probs: torch.Tensor, test_label: torch.Tensor) -> None:
    """One precision-recall curve per class."""
    for class_index, name in enumerate(CLASSES):
        writer.add_pr_curve(name, test_label == class_index, test_probs[:, class_index], global_step=0)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    trainset, trainloader, testloader = load_data(args.data_dir, args.num_workers)
    net = Net()
    writer = SummaryWriter(args.log_dir)
    inspect(writer, net, trainset, trainloader)
    train_seconds = train(net, trainloader, writer, args.max_batches)
    test_probs, test_label = test_probabilities(net, testloader)
    add_pr_curves(writer, test_probs, test_label)
    writer.close()
    accuracy = (test_probs.argmax(dim=1) == test_label).float().mean().item()
    print(json.dumps({"train_seconds": round(train_seconds, 3), "test_accuracy": round(accuracy, 4)}))


if __name__ == "__main__":
    main()
