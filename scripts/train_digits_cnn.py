"""Train the small CNN shipped as ``vecsim/data/digits_cnn.pt`` on the built-in digits.

The images go through the very files and preprocessing vecsim feeds the model at
analysis time (the PNGs from ``materialize_digits`` and ``preprocess_digit``), so
the shipped weights see the same inputs in training as in use.

Run with: python scripts/train_digits_cnn.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from sklearn.model_selection import train_test_split
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vecsim.digits import (  # noqa: E402
    DIGITS_NUM_CLASSES,
    WEIGHTS_PATH,
    DigitsCNN,
    materialize_digits,
    preprocess_digit,
)


def load_dataset(root: Path) -> tuple[torch.Tensor, torch.Tensor, list[Path]]:
    """Preprocess every PNG once up front; the set is tiny, so epochs then cost only compute."""
    paths = sorted(root.glob("*/*.png"), key=lambda p: p.name)  # index order, as in load_digits
    images, labels = [], []
    for path in paths:
        with Image.open(path) as img:
            images.append(preprocess_digit(img))
        labels.append(int(path.parent.name))
    return torch.stack(images), torch.tensor(labels), paths


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random shifts of up to ``max_shift`` pixels so the model does not memorise positions.

    Pads with each image's own border value (the normalised background) and crops
    back, drawing offsets from ``generator`` so a run is reproducible.
    """
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    return torch.stack(
        [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())]
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=2, help="fixed so float sums (and weights) repeat"
    )
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    parser.add_argument(
        "--data-root", type=Path, default=None, help="where to materialize the PNGs"
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        torch.use_deterministic_algorithms(True)
    except RuntimeError as exc:  # pragma: no cover - CPU supports it today
        print(f"deterministic algorithms unavailable: {exc}", file=sys.stderr)

    root = materialize_digits(args.data_root)
    x, y, _ = load_dataset(root)
    train_idx, test_idx = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.2, random_state=args.seed, stratify=y.numpy()
    )
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    print(f"data: {len(y_train)} train / {len(y_test)} test images from {root}")

    model = DigitsCNN(num_classes=DIGITS_NUM_CLASSES)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = (len(y_train) + args.batch_size - 1) // args.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(args.seed)

    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        total = 0.0
        for batch in order.split(args.batch_size):
            xb = augment(x_train[batch], generator)
            loss = loss_fn(model(xb), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(batch)
        print(
            f"epoch {epoch:2d}  loss {total / len(y_train):.4f}  "
            f"test acc {accuracy(model, x_test, y_test):.4f}"
        )

    train_acc, test_acc = accuracy(model, x_train, y_train), accuracy(model, x_test, y_test)
    state = {
        name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    elapsed = time.perf_counter() - start
    print(f"train accuracy {train_acc:.4f}  test accuracy {test_acc:.4f}")
    print(f"saved {args.out} ({args.out.stat().st_size / 1024:.1f} KiB) in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
