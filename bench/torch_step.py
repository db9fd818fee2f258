"""PyTorch eager twin of hiercon's `resnet-mini` training step, for `make bench-torch`.

The network, head, loss (HiMulConE with the published code's dedup) and optimizer follow
`src/model` and `src/loss` exactly, so the step time is comparable with `benches/train_step.rs`.
Prints one JSON object: seconds per step (median), images per second, threads. With `--serve`
it stays up after warm-up and runs steps on request (`steps K` on stdin, one JSON line of K step
times back), so the Rust bench can alternate short blocks of its steps and ours.
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResnetMini(nn.Module):
    """Stem conv3x3 s2 (3->32), blocks 32->32 s1, 32->64 s2, 64->128 s2, GAP, head 128->128->128, L2."""

    def __init__(self, dim=128):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(32, 32, 1), BasicBlock(32, 64, 2), BasicBlock(64, 128, 2))
        self.fc1 = nn.Linear(128, 128)
        self.fc2 = nn.Linear(128, dim)

    def forward(self, x):
        f = torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)
        return F.normalize(self.fc2(F.relu(self.fc1(f))), dim=1)


def supcon(z, mask, t=0.1, t0=0.07):
    """SupCon ("all" mode) over 2N views; `mask` [N,N] marks same-label samples."""
    n2 = z.shape[0]
    logits = z @ z.T / t
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    mask = mask.repeat(2, 2).float()
    not_self = 1.0 - torch.eye(n2, device=z.device)
    mask = mask * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    mean_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return -(t / t0) * mean_pos.mean()


def hmce(z, labels):
    """HiMulConE with the published code's dedup, exp(1/l) penalty, divided by K."""
    n, k = labels.shape
    total = z.new_zeros(())
    max_loss = z.new_tensor(-math.inf)
    views = (z[:n], z[n:])
    lab = labels
    for level in range(1, k):
        cols = k - level
        key = lab[:, :cols]
        mask = (key[:, None, :] == key[None, :, :]).all(-1)
        loss = supcon(torch.cat(views), mask)
        loss = torch.maximum(loss, max_loss)
        max_loss = torch.maximum(max_loss, loss.detach())
        total = total + math.exp(1.0 / level) * loss
        # keep one sample per distinct level key, in sorted key order
        _, inverse = torch.unique(key, dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), lab.shape[0], dtype=torch.long)
        first = first.scatter_reduce(0, inverse, torch.arange(lab.shape[0]), reduce="amin")
        lab = lab[first]
        views = (views[0][first], views[1][first])
    return total / k


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=64, help="images per step (2N)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="0: torch's default")
    p.add_argument("--serve", action="store_true",
                   help="after warm-up, read 'steps K' lines on stdin; answer each with one JSON line "
                        "of K step times (lets a caller interleave its own steps with ours)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = ResnetMini()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    n = a.images // 2
    images = torch.randn(a.images, 3, a.size, a.size)
    # The label columns of benches/train_step.rs: category, subcategory, product, variation, image.
    i = torch.arange(n)
    labels = torch.stack([i % 3, i % 6, i // 2, i, 100 + i], 1)

    def step():
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = hmce(model(images), labels)
        loss.backward()
        opt.step()
        loss.detach().item()
        return time.perf_counter() - t0

    for _ in range(a.warmup):
        step()
    info = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    if a.serve:
        print(json.dumps({"ready": True, **info}), flush=True)
        for line in sys.stdin:
            words = line.split()
            if words[:1] != ["steps"]:
                break
            print(json.dumps({"times": [step() for _ in range(int(words[1]))]}), flush=True)
        return
    times = [step() for _ in range(a.steps)]
    s = statistics.median(times)
    print(json.dumps({"seconds_per_step": s, "images_per_s": a.images / s, "steps": a.steps, **info}))


if __name__ == "__main__":
    main()
