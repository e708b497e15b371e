#!/usr/bin/env python3
"""How large do the fp16 gradients get? The first training steps of a preset's net at its batch
size, in fp32 on whatever device, printing per step the largest gradient of every weight that CUDA
autocast computes in fp16 (conv/linear weights, the stem's bias) and the spread of the activation
gradients. Feeds `hw2.GRAD_MAX_PER_1024` / `hw2.fp16_loss_scale` (BENCHMARKS.md).

    python tools/fp16_grad_range.py --preset full --steps 4 --data-dir D     # ~1 min/step on 2 cores
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hw2  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="full")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--data-dir", required=True)
    a = ap.parse_args()
    hp = hw2.PRESETS[a.preset]
    bs = hp["batch_size"]
    x, y, _ = hw2.load_cifar_train(hw2.find_data_dir(a.data_dir, allow_download=False)[0])
    x, y = torch.from_numpy(x[:6 * bs]), torch.from_numpy(y[:6 * bs])
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = hw2.Net(hp["widths"], hp["residual"]).to(memory_format=torch.channels_last)
    hw2.init_whitening(model.whiten, hw2.normalize(x[:5000]))
    opt = hw2.make_optimizer(model, hp, bs)
    lookahead = hw2.Lookahead(model)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=hp["label_smoothing"], reduction="sum")
    acts = {}

    def hook(name):
        def f(mod, inp, out):
            if out.requires_grad:
                out.register_hook(lambda g: acts.__setitem__(name, g.detach().abs().flatten()))
        return f

    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            m.register_forward_hook(hook(n))
    base_flip = torch.rand(len(x), generator=gen) < 0.5
    total = hp["epochs"] * (45000 // bs)
    for step in range(a.steps):
        xe = hw2.augment_epoch(x, 0, base_flip, hp, gen).contiguous(memory_format=torch.channels_last)
        idx = torch.randperm(len(x), generator=gen)[:bs]
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * hw2.lr_factor(step, total, hp["warmup"])
        t0 = time.time()
        loss = loss_fn(model(xe[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        acts.clear()
        loss.backward()
        fp16 = {n: p.grad.abs().max().item() for n, p in model.named_parameters()
                if p.grad is not None and "norm" not in n}
        act = torch.cat(list(acts.values()))
        nz = act[act > 0]
        sample = nz[torch.randperm(len(nz), generator=gen)[:2_000_000]]
        print(json.dumps(dict(
            preset=a.preset, step=step + 1, loss=round(loss.item(), 1), seconds=round(time.time() - t0, 1),
            max_fp16_weight_grad=max(fp16.values()), where=max(fp16, key=fp16.get),
            act_grad_max=act.max().item(), act_grad_median=sample.median().item(),
            act_grad_q001=sample.quantile(0.001).item(), init_scale=hw2.fp16_loss_scale(bs))), flush=True)
        opt.step()
        if (step + 1) % 5 == 0:
            lookahead.update(model, 0.95 ** 5 * ((step + 1) / total) ** 3)


if __name__ == "__main__":
    main()
