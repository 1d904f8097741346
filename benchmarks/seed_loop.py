"""The seed document's recipe as the plain PyTorch loop it was written as: the baseline of `make bench`.

Its structure on purpose, pitfalls included: BatchNorm left in train mode, the frozen backbone recomputed
on every image every epoch, fp32, SGD handed every parameter. Prints one JSON line per epoch and a final
result line. Not used by the project itself.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from torchvision import datasets
from torchvision import transforms as T

from src.models.backbones import packaged_efficientnet_lite, torchvision_model, weights_preprocessing


def seed_model(name: str, pretrained: bool) -> tuple[nn.Module, str]:
    """The backbone with its ImageNet classifier, and the attribute holding that classifier."""
    if name.startswith("efficientnet_lite"):
        return packaged_efficientnet_lite(name, "DEFAULT" if pretrained else None)[0], "classifier"
    return torchvision_model(name, "DEFAULT" if pretrained else None)[0], "fc"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    weights = weights_preprocessing(a.backbone)
    mean, std = weights.mean, weights.std
    model, head_attr = seed_model(a.backbone, not a.random_weights)
    train_tf = T.Compose(
        [
            T.RandomResizedCrop(256, scale=(0.8, 1.0)),
            T.RandomRotation(15),
            T.RandomHorizontalFlip(),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
    valid_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(mean, std)])
    train = datasets.ImageFolder(f"{a.data}/train", train_tf)
    valid = datasets.ImageFolder(f"{a.data}/val", valid_tf)
    train_dl = torch.utils.data.DataLoader(train, a.batch_size, shuffle=True, num_workers=a.workers)
    valid_dl = torch.utils.data.DataLoader(valid, a.batch_size, num_workers=a.workers)
    for param in model.parameters():
        param.requires_grad = False
    in_features = getattr(model, head_attr).in_features
    setattr(
        model,
        head_attr,
        nn.Sequential(
            nn.Linear(in_features, 256),
            nn.ReLU(),
            nn.Dropout(0.4),
            nn.Linear(256, len(train.classes)),
            nn.LogSoftmax(dim=1),
        ),
    )
    loss_fn = nn.NLLLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    best_loss, best_acc = float("inf"), 0.0
    start = time.perf_counter()
    for epoch in range(a.epochs):
        model.train()  # the seed's pitfall: frozen BatchNorm layers normalise with batch statistics
        for x, y in train_dl:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
        model.eval()
        total, correct = 0.0, 0
        with torch.no_grad():
            for x, y in valid_dl:
                out = model(x)
                total += loss_fn(out, y).item() * len(y)
                correct += (out.argmax(1) == y).sum().item()
        val_loss, val_acc = total / len(valid), correct / len(valid)
        if val_loss < best_loss:
            best_loss, best_acc = val_loss, val_acc
        print(
            json.dumps(
                {
                    "epoch": epoch + 1,
                    "val_loss": val_loss,
                    "val_acc": val_acc,
                    "t": round(time.perf_counter() - start, 2),
                }
            ),
            flush=True,
        )
    print(
        json.dumps(
            {
                "result": "seed_loop",
                "backbone": a.backbone,
                "epochs": a.epochs,
                "wall_s": round(time.perf_counter() - start, 2),
                "best_val_loss": best_loss,
                "best_val_acc": best_acc,
                "images": len(train) + len(valid),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
