"""The one evaluation path, used by `sparta train`, `sparta eval` and `sparta predict`: batched, no
gradients, each example counted once across processes. How a batch becomes predictions is the
task kind's `scorer` (tasks/kinds.py). A token-level kind's (SFT) scorer gives each row's summed token
loss and supervised tokens instead, and the split's loss is the sum of the one over the sum of the
other: every token counts once, however the rows fall into batches."""

from __future__ import annotations

import numpy as np
import torch

from sparta_cli.metrics import compute_metrics
from sparta_cli.tasks import Scorer, Task


@torch.no_grad()
def predict(model: torch.nn.Module, loader, accelerator, scorer: Scorer, progress=None) -> tuple[np.ndarray, np.ndarray, float | None]:
    """All predictions and labels of a loader, gathered across processes, plus the mean loss."""
    was_training = model.training
    model.eval()
    preds, labels = [], []
    loss_sum, count = 0.0, 0
    for batch in loader:
        with accelerator.autocast():  # bf16 on GPU; a no-op without mixed precision
            batch_preds, batch_loss = scorer(model, batch)
        batch_labels = batch["labels"]
        # gather_for_metrics drops the samples Accelerate repeats to even out the last batch
        batch_preds, batch_labels = accelerator.gather_for_metrics((batch_preds, batch_labels))
        preds.append(batch_preds.cpu())
        labels.append(batch_labels.cpu())
        if batch_loss is not None:
            batch_loss = accelerator.gather_for_metrics(batch_loss.detach())
            loss_sum += float(batch_loss.double().sum())
            count += int(batch_loss.shape[0])
        if progress is not None:
            progress()
    model.train(was_training)
    pred_arr = torch.cat(preds).numpy() if preds else np.empty(0)
    label_arr = torch.cat(labels).numpy() if labels else np.empty(0)
    return pred_arr, label_arr, (loss_sum / count if count else None)


@torch.no_grad()
def token_sums(model: torch.nn.Module, loader, accelerator, scorer: Scorer, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's summed token loss and supervised tokens (a token-level kind's scorer), gathered across processes."""
    was_training = model.training
    model.eval()
    losses, tokens = [], []
    for batch in loader:
        with accelerator.autocast():
            batch_losses, batch_tokens = scorer(model, batch)
        batch_losses, batch_tokens = accelerator.gather_for_metrics((batch_losses, batch_tokens))
        losses.append(batch_losses.double().cpu())
        tokens.append(batch_tokens.cpu())
        if progress is not None:
            progress()
    model.train(was_training)
    return torch.cat(losses).numpy(), torch.cat(tokens).numpy()


def evaluate_split(model, loader, accelerator, task: Task, split: str, scorer: Scorer, subjects=None, progress=None) -> dict[str, float]:
    """Metrics of one split with the split's suffix (`accuracy_mm` for MNLI mismatched).

    MMLU's `subject` column comes from the loader's dataset: the loader is not shuffled and
    `gather_for_metrics` returns every example once, in dataset order."""
    suffix = task.metric_suffixes.get(split, "")
    if task.kind.token_level:
        losses, tokens = token_sums(model, loader, accelerator, scorer, progress)
        metrics = compute_metrics(task, losses, tokens)
        return {**{f"{key}{suffix}": float(value) for key, value in metrics.items()}, f"num_examples{suffix}": int(len(tokens))}
    preds, labels, loss = predict(model, loader, accelerator, scorer, progress)
    if subjects is None and "subject" in loader.dataset.column_names:
        subjects = list(loader.dataset.with_format(None)["subject"])
    if subjects is not None and len(subjects) != len(labels):
        raise RuntimeError(f"{len(labels)} predictions for {len(subjects)} subjects: the loader must not shuffle or drop examples")
    results: dict[str, float] = {}
    metrics = compute_metrics(task, preds, labels, subjects=subjects)
    results.update({f"{key}{suffix}": float(value) for key, value in metrics.items()})
    if loss is not None:
        results[f"loss{suffix}"] = loss
    results[f"num_examples{suffix}"] = int(len(labels))
    return results
