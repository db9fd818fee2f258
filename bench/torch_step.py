"""PyTorch eager twins of hiercon's training steps, for `make bench-torch`.

`--arch resnet-mini` (the default) or `efficientnet-lite0`: the network, head, loss (HiMulConE
with the published code's dedup) and optimizer follow `src/model` and `src/loss` exactly, so the
step time is comparable with `benches/train_step.rs`. `--freeze N` freezes the first N units as
hiercon's `--freeze` does (parameters without gradient, BatchNorm in eval mode, not given to the
optimizer). Initial weights are random (seed 0): this times steps, it does not train.
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


class Head(nn.Module):
    """hiercon's projection head: Linear(d, d), ReLU, Linear(d, dim), L2 normalisation."""

    def __init__(self, d, dim=128):
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, dim)

    def forward(self, f):
        return F.normalize(self.fc2(F.relu(self.fc1(f))), dim=1)


class ResnetMini(nn.Module):
    """Stem conv3x3 s2 (3->32), blocks 32->32 s1, 32->64 s2, 64->128 s2, GAP, head 128->128->128, L2."""

    def __init__(self, dim=128):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(32, 32, 1), BasicBlock(32, 64, 2), BasicBlock(64, 128, 2))
        self.head = Head(128, dim)

    def units(self):
        """What `--freeze` counts: the stem, then each stage."""
        return [self.stem, *self.layers]

    def forward(self, x):
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class SameConv(nn.Conv2d):
    """Bias-free Conv2d with TensorFlow "SAME" padding: total max((ceil(n/s)-1)s + k - n, 0) per
    axis, the odd pixel at the bottom / right; symmetric padding goes to the conv itself, as
    hiercon's `conv_tf_same` lowers it."""

    def __init__(self, cin, cout, k, stride=1, groups=1):
        super().__init__(cin, cout, k, stride, 0, groups=groups, bias=False)

    def forward(self, x):
        pads = []
        for n in (x.shape[3], x.shape[2]):  # F.pad's order: left, right, top, bottom
            total = max((-(-n // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - n, 0)
            pads += [total // 2, total - total // 2]
        if len(set(pads)) == 1:
            return F.conv2d(x, self.weight, None, self.stride, pads[0], 1, self.groups)
        return super().forward(F.pad(x, pads))


def bn(c):
    """EfficientNet-Lite's BatchNorm: eps 1e-3, momentum 0.01 (PyTorch's sense, as hiercon's)."""
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """[1x1 expand, BN, ReLU6,] kxk depthwise (stride), BN, ReLU6, 1x1 project, BN [+ x]."""

    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        mid = cin * expand
        layers = [] if expand == 1 else [nn.Conv2d(cin, mid, 1, bias=False), bn(mid), nn.ReLU6()]
        layers += [SameConv(mid, mid, k, stride, groups=mid), bn(mid), nn.ReLU6()]
        layers += [nn.Conv2d(mid, cout, 1, bias=False), bn(cout)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return y + x if self.residual else y


# EfficientNet-B0's stages: (kernel, stride, expansion, output width, repeats).
B0_STAGES = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
             (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]


class EfficientNetLite0(nn.Module):
    """Stem SAME conv3x3 s2 (3->32), BN, ReLU6; B0's 16 MBConv blocks without squeeze-excitation;
    head conv1x1 320->1280, BN, ReLU6; GAP; head 1280->1280->128, L2."""

    def __init__(self, dim=128):
        super().__init__()
        self.stem = nn.Sequential(SameConv(3, 32, 3, 2), bn(32), nn.ReLU6())
        stages, cin = [], 32
        for k, stride, expand, cout, repeats in B0_STAGES:
            blocks = [MBConv(cin if r == 0 else cout, cout, k, stride if r == 0 else 1, expand) for r in range(repeats)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.conv_head = nn.Sequential(nn.Conv2d(320, 1280, 1, bias=False), bn(1280), nn.ReLU6())
        self.head = Head(1280, dim)

    def units(self):
        """What `--freeze` counts: the stem, each of the 7 stages, the head conv (9 units)."""
        return [self.stem, *self.stages, self.conv_head]

    def forward(self, x):
        f = self.conv_head(self.stages(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1))


ARCHS = {"resnet-mini": ResnetMini, "efficientnet-lite0": EfficientNetLite0}


def freeze(model, n):
    """Freezes the first `n` units: no gradient, BatchNorm in eval mode (running statistics,
    no update). Call after `model.train()`; returns the trainable parameters."""
    units = model.units()
    if n > len(units):
        raise SystemExit(f"--freeze {n}: the model has {len(units)} units")
    for unit in units[:n]:
        unit.eval()
        for q in unit.parameters():
            q.requires_grad_(False)
    return [q for q in model.parameters() if q.requires_grad]


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
    p.add_argument("--arch", choices=sorted(ARCHS), default="resnet-mini")
    p.add_argument("--freeze", type=int, default=0, help="leading units frozen (see units())")
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
    model = ARCHS[a.arch]()
    model.train()
    params = freeze(model, a.freeze)
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
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
    info = {"arch": a.arch, "freeze": a.freeze, "size": a.size, "images": a.images,
            "trainable_params": sum(q.numel() for q in params),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
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
