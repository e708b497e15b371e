"""Drives hw2's data-parallel launcher without Problems 1-3 (a test helper, not a test).

python tests/ddp_helper.py MODE OUT [hw2 flags...]: smoke-trains on synthetic images through
`hw2.train_distributed` exactly as the notebook's training cell calls it, after
`hw2.parse_config`/`hw2.choose_hardware` read the flags. Each rank writes the sha256 of its final
state_dict to OUT/../rank<R>.sha256. MODE injects a fault: `ok` none; `raise` rank 1 raises an
HW2Error at step 3 while rank 0 trains on (and blocks in the next all-reduce); `hang` rank 1
raises while rank 0 sleeps outside any collective; `interrupt` every rank stops at the first
step of epoch 2 (checkpoint.pt holds epoch 1); `slow` every step sleeps 0.5 s (for Ctrl-C).
`grads`, `end_epoch` and `recount` train nothing: on two forked ranks they check one step's
sharded, summed gradients, DataParallel.end_epoch's sums and averages, and the final BatchNorm
recount's shards and average, and print one line per rank.
Env DDP_HELPER_CPUS=N: usable_cpus() says N, and the parent runs a parallel op on N threads first.
Env DDP_HELPER_FP16=1: the ranks train as on Kaggle's T4 ×2 (fp16 autocast, GradScaler, the fused
optimizer step; CPU autocast runs fp16 too) with Muon, the default GPU presets' optimizer.
"""
import hashlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hw2  # noqa: E402

mode, out, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.excepthook = hw2._script_excepthook  # what `python hw2.py` installs: one line per HW2Error


def state_sha(model):
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


_train_rank, _lr_factor = hw2.train_rank, hw2.lr_factor


def train_rank(rank, world, *args, **kw):
    model, history = _train_rank(rank, world, *args, **kw)
    with open(os.path.join(os.path.dirname(out), f"rank{rank}.sha256"), "w") as f:
        f.write(state_sha(model))
    return model, history


def lr_factor(step, total, warmup):
    rank = hw2.DIST.rank
    if mode == "slow":
        time.sleep(0.5)
    if mode == "interrupt" and step == 16:  # the first step of epoch 2 (smoke: 16 steps/epoch)
        raise hw2.HW2Error(f"injected interruption on rank {rank}")
    if mode in ("raise", "hang") and step == 3:
        if rank == 1:
            raise hw2.HW2Error("injected failure on rank 1")
        if mode == "hang":
            time.sleep(3600)
    return _lr_factor(step, total, warmup)


def _join(rank, world, workdir):
    """Rank `rank` joins a gloo group of `world` through a file store in `workdir`."""
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(workdir, "store"), world),
                            rank=rank, world_size=world)


def check_grads(rank, world, workdir):
    """One step through DataParallel's shard + DDP wrap equals one process on the whole batch."""
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F
    _join(rank, world, workdir)
    dp = hw2.DataParallel(rank, world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    idx = dp.shard(torch.randperm(32, generator=torch.Generator().manual_seed(1)))
    net = dp.wrap(model, False)  # held, as train() holds it: DDP's hooks live with the wrapper
    F.cross_entropy(net(x[idx]), y[idx], reduction="sum").backward()
    F.cross_entropy(ref(x), y, reduction="sum").backward()
    shards = [torch.zeros_like(idx) for _ in range(world)]
    dist.all_gather(shards, idx)
    err = max(float((p.grad - q.grad).abs().max() / q.grad.abs().max())
              for p, q in zip(model.parameters(), ref.parameters()))
    with open(os.path.join(workdir, f"grads.{rank}"), "w") as f:
        f.write(f"{len(idx)} {sorted(torch.cat(shards).tolist()) == list(range(32))} {err:.3g}")
    dist.destroy_process_group()


def check_end_epoch(rank, world, workdir):
    """DataParallel.end_epoch on two ranks that saw different data: the epoch's loss and correct
    counts are summed, BatchNorm's running statistics and their lookahead copies averaged."""
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    _join(rank, world, workdir)
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    lookahead = hw2.Lookahead(model)
    with torch.no_grad():
        model[1].running_mean.fill_(rank + 1.0)         # 1 and 2: the average is 1.5
        lookahead.slow["1.running_var"].fill_(10.0 * (rank + 1))  # 10 and 20: 15
        model[1].num_batches_tracked.fill_(7 + rank)    # a count: not a statistic to average
    loss, correct = torch.tensor(rank + 1.0), torch.tensor(10.0 * (rank + 1))
    hw2.DataParallel(rank, world).end_epoch(model, lookahead, loss, correct)
    with open(os.path.join(workdir, f"end_epoch.{rank}"), "w") as f:
        f.write(f"{loss.item():g} {correct.item():g} {model[1].running_mean.tolist()} "
                f"{lookahead.slow['1.running_var'].tolist()} {int(model[1].num_batches_tracked)}")
    dist.destroy_process_group()


def check_recount(rank, world, workdir):
    """recompute_bn_stats on two ranks, then train_rank's average: each rank forwards its shard of
    each batch (counted by a hook), and the averaged statistics are one process's recount at the
    per-rank batch, not at the global one (BatchNorm's batch statistics depend on the batch)."""
    import torch
    import torch.distributed as dist
    _join(rank, world, workdir)
    hp = hw2.PRESETS["smoke"]
    torch.manual_seed(0)
    model = hw2.Net(hp["widths"], hp["residual"]).to(memory_format=torch.channels_last)
    images = torch.from_numpy(hw2.synthetic_cifar(96, seed=5)[0])
    batch, seen = 32, []  # 3 global batches of 16 + 16 images
    refs = {}
    for b in (batch // world, batch):  # one process's recounts at the per-rank and the global batch
        ref = hw2.Net(hp["widths"], hp["residual"]).to(memory_format=torch.channels_last)
        ref.load_state_dict(model.state_dict())
        hw2.recompute_bn_stats(ref, images, "cpu", "fp32", b, hp, seed=1, n_images=96)
        refs[b] = ref
    hw2.DIST = dp = hw2.DataParallel(rank, world)
    model.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    hw2.recompute_bn_stats(model, images, "cpu", "fp32", batch, hp, seed=1, n_images=96)
    dp.average_buffers(model)
    hw2.DIST = hw2.SingleProcess()

    def gap(ref):
        return max(float((v - ref.state_dict()[k]).abs().max() / ref.state_dict()[k].abs().max())
                   for k, v in model.state_dict().items() if "running" in k)
    with open(os.path.join(workdir, f"recount.{rank}"), "w") as f:
        f.write(f"{seen} {gap(refs[batch // world]):.3g} {gap(refs[batch]):.3g}")
    dist.destroy_process_group()


if mode in ("grads", "end_epoch", "recount"):
    from torch.multiprocessing import start_processes
    os.makedirs(out)
    check = dict(grads=check_grads, end_epoch=check_end_epoch, recount=check_recount)[mode]
    start_processes(check, args=(2, out), nprocs=2, start_method="fork")
    for r in range(2):
        with open(os.path.join(out, f"{mode}.{r}")) as f:
            print(f"rank {r}: {f.read()}")
    sys.exit(0)


hw2.train_rank, hw2.lr_factor = train_rank, lr_factor
if os.environ.get("DDP_HELPER_CPUS"):  # a machine with more cores, whose parent used them all
    import torch                       # before forking (the notebook: Problems 1-3)
    n_cpus = int(os.environ["DDP_HELPER_CPUS"])
    hw2.usable_cpus = lambda: n_cpus
    torch.set_num_threads(n_cpus)
    torch.ones(2**22).add_(1)          # a parallel region: GNU OpenMP starts its worker threads
cfg = hw2.parse_config(["--preset", "smoke", "--output-dir", out, *flags])
cfg.output_dir = hw2.prepare_output_dir(cfg.output_dir)
hw = hw2.choose_hardware(cfg)
x, y = hw2.synthetic_cifar(640, seed=3)
tx, ty, vx, vy = hw2.split_train_val(x, y, 128)
data = dict(train_x=tx, train_y=ty, val_x=vx, val_y=vy)
print(f"world_size {hw['world_size']}", flush=True)
hp = dict(hw2.PRESETS["smoke"])
if os.environ.get("DDP_HELPER_FP16"):
    hw["precision"] = "fp16"  # select_hardware allows it on a GPU only; the code path is the same
    hp = hw2.preset_hparams("smoke", hw, optimizer="muon")
if hw["world_size"] > 1:
    model, history, batch = hw2.train_distributed(data, hp, hw, cfg)
else:  # the single-process path of the training cell
    model, history, batch = hw2.train_with_oom_retry(data, hp, hw, cfg)
print(f"parent {state_sha(model)} epochs {len(history)} batch {batch}", flush=True)
