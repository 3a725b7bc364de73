"""Evaluation: loss and accuracy on a split, and the test metrics every run reports — computed here
only, for a trained model (``train``) and for a compressed one (``deployment``) alike.

Images stay uint8 on the device; a batch is normalized as ``x * scale - shift`` ==
``(x / 255 - mean) / std``. Evaluation is never timed.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from cnnbench import devices


def batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def normalizer(data, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale`` and ``shift`` with ``x_uint8 * scale - shift == (x/255 - mean)/std`` per channel."""
    c = data.shape[0]
    mean, std = data.mean_std
    scale = (1.0 / (255.0 * std)).view(1, c, 1, 1).to(device)
    shift = (mean / std).view(1, c, 1, 1).to(device)
    return scale, shift


def index_device(device: torch.device) -> torch.device:
    """Where batch indices live: on the host for XLA (slicing a device tensor would bake each batch's
    offset into a new graph), on the device elsewhere."""
    return torch.device("cpu") if device.type == "xla" else device


@torch.no_grad()
def evaluate(model, x_all, y_all, idx, scale, shift, batch_size, device, want_preds=False,
             autocast=contextlib.nullcontext, memory_format=torch.contiguous_format):
    """Loss and accuracy of ``model`` on ``x_all[idx]`` (and the predictions, if asked), in the
    precision and memory format it was trained in (``autocast`` makes a fresh context per batch)."""
    with torch.inference_mode(device.type != "xla"):  # XLA tensors do not support inference mode
        model.eval()
        loss_sum = torch.zeros((), device=device, dtype=devices.accumulator_dtype(device))
        correct = torch.zeros((), device=device, dtype=torch.int64)
        preds = []
        for lo, hi in batches(len(idx), batch_size):
            bi = idx[lo:hi].to(device)
            xb = x_all[bi].float().mul_(scale).sub_(shift).contiguous(memory_format=memory_format)
            yb = y_all[bi]
            with autocast():
                out = model(xb)
            loss_sum += F.cross_entropy(out.float(), yb, reduction="sum")
            pred = out.argmax(1)
            correct += (pred == yb).sum()
            if want_preds:
                preds.append(pred)
            devices.step_done(device)
        n = max(len(idx), 1)
        loss, acc = loss_sum.item() / n, correct.item() / n
        return loss, acc, (torch.cat(preds).cpu() if want_preds and preds else None)


def test_metrics(model, data, batch_size: int, device: torch.device, autocast=contextlib.nullcontext,
                 memory_format=torch.contiguous_format) -> tuple[dict[str, float], list[list[int]]]:
    """Test accuracy, loss and macro precision/recall/F1, and the confusion matrix."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    scale, shift = normalizer(data, device)
    test_x, test_y = devices.to_device(data.test_x, device), devices.to_device(data.test_y, device)
    all_idx = torch.arange(len(test_y), device=index_device(device))
    loss, acc, preds = evaluate(model, test_x, test_y, all_idx, scale, shift, batch_size, device, want_preds=True,
                                autocast=autocast, memory_format=memory_format)
    y_true = data.test_y.numpy()
    p, r, f1, _ = precision_recall_fscore_support(y_true, preds.numpy(), average="macro", zero_division=0)
    confusion = confusion_matrix(y_true, preds.numpy(), labels=list(range(data.num_classes))).tolist()
    return {"test_accuracy": acc, "test_loss": loss, "precision_macro": p, "recall_macro": r, "f1_macro": f1}, confusion
