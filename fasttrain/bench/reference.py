"""The reference training loop (pytorch/examples imagenet/main.py) as it behaves, for side-by-side timing.

Written for fasttrain from the script's description, not copied. What it does, and so what this does:
- data: torchvision.datasets.ImageFolder + PIL, transforms.Compose([RandomResizedCrop(224),
  RandomHorizontalFlip(), ToTensor(), Normalize(ImageNet mean/std)]): float32 tensors built on the CPU,
  in DataLoader(num_workers=N, pin_memory=True, shuffle=True) workers, which restart each epoch;
- model: fp32, NCHW, a torchvision model moved to the device; plain SGD (momentum, weight decay);
- cuDNN: the current script never sets cudnn.benchmark (it only sets it False, with deterministic, under
  --seed), so it runs with PyTorch's default, False. Old versions of the script set it True at import;
  `cudnn_benchmark=True` reproduces those;
- per step: images/target `.to(device, non_blocking=True)`; `losses.update(loss.item(), n)` (a host-device
  sync every step) and top-1/top-5 accuracy computed every step.
One GPU, no DataParallel: what the script does with `--gpu 0` (without it, a 1-GPU machine gets a
DataParallel wrapper, which only adds overhead, so this is the faster and more generous reading).

    python benchmarks/reference_loop.py DATA -a resnet18 -b 256 -j 16 --steps 100   # runs it alone
"""

from __future__ import annotations

import torch
import torchvision
import torchvision.transforms as T

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def reference_dataset(train_dir: str, image_size: int = 224, repeat: int = 1) -> torch.utils.data.Dataset:
    """ImageFolder with the reference's train transform. `repeat` > 1 chains the folder that many times, so
    one epoch of a small benchmark folder lasts as long as needed (ImageNet's epoch is 5,005 batches)."""
    tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(mean=MEAN, std=STD)])
    ds = torchvision.datasets.ImageFolder(train_dir, tf)
    return ds if repeat == 1 else torch.utils.data.ConcatDataset([ds] * repeat)


def reference_loader(dataset, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    # The reference passes pin_memory=True unconditionally; without an accelerator PyTorch ignores it with a
    # warning, so it is only asked for where it means something.
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       pin_memory=torch.cuda.is_available())


def accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[torch.Tensor]:
    """Percent of the batch whose label is in the top k, for each k (device tensors, as the reference)."""
    with torch.no_grad():
        pred = output.topk(max(topk), 1, True, True).indices.t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum(0, keepdim=True) * (100.0 / target.size(0)) for k in topk]


class AverageMeter:
    def __init__(self):
        self.sum, self.count = 0.0, 0

    def update(self, val, n: int = 1):
        self.sum += val * n
        self.count += n

    @property
    def avg(self):
        return self.sum / max(self.count, 1)


class ReferenceStep:
    """One train step of the reference's train(): copy, forward, loss, accuracy, meters, SGD step."""

    def __init__(self, arch: str, num_classes: int, device: torch.device, lr: float = 0.1,
                 cudnn_benchmark: bool = False):
        torch.backends.cudnn.benchmark = cudnn_benchmark
        self.device = device
        self.model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes).to(device)
        self.model.train()
        self.criterion = torch.nn.CrossEntropyLoss().to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr, momentum=0.9, weight_decay=1e-4)
        self.losses, self.top1, self.top5 = AverageMeter(), AverageMeter(), AverageMeter()

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> None:
        images = images.to(self.device, non_blocking=True)
        target = target.to(self.device, non_blocking=True)
        output = self.model(images)
        loss = self.criterion(output, target)
        acc1, acc5 = accuracy(output, target, topk=(1, min(5, output.shape[1])))
        self.losses.update(loss.item(), images.size(0))  # host sync, every step, as the reference's meter
        self.top1.update(acc1[0], images.size(0))
        self.top5.update(acc5[0], images.size(0))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
