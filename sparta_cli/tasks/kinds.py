"""The kinds of task: what a head predicts, how a batch is scored, which metrics it reports.

- CLASSIFICATION: a classification head sparta trains; GLUE's scores (accuracy, plus Matthews
  correlation for CoLA, or F1 of class 1 and `combined_score` = their mean for MRPC and QQP), and
  with `subjects` (MMLU) accuracy by category and by subject.
- REGRESSION: one output trained with MSE (STS-B, `task.type: regression`); Pearson, Spearman and
  their mean as `combined_score`.
- LM_CHOICE: multiple choice scored by the model's own next-token logits over the answer letters
  (MMLU with `task.head: lm`); nothing to train; classification's metrics.
- SFT: a causal LM trained on the answers' tokens (`task.type: sft`, docs/sft.md) through its own
  next-token head; loss (summed token loss over supervised tokens) and perplexity, lower is better.

Metric names follow GLUE so results compare with papers; split suffixes (MNLI's `_mm`) are the caller's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from sparta_cli.config import TaskConfig
from sparta_cli.errors import SpartaError
from sparta_cli.tasks.base import Scorer, Task, TaskKind


def classifier_scorer(regression: bool) -> Scorer:
    """Predictions from a sequence-classification head, and each example's loss (the same
    losses transformers trains with: MSE for regression, cross-entropy otherwise)."""
    import torch

    def score(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits.float()
        labels = batch.get("labels")
        preds = logits.squeeze(-1) if regression else logits.argmax(-1)
        losses = row_losses(logits, labels, regression) if labels is not None and (regression or (labels >= 0).all()) else None
        return preds, losses

    return score


def row_losses(logits: Any, labels: Any, regression: bool) -> Any:
    """Each row's loss from a classification head's fp32 logits: what transformers averages (MSE for
    regression, cross-entropy otherwise)."""
    import torch

    if regression:
        return (logits.squeeze(-1) - labels.float()) ** 2
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none")


def classifier_train_loss(model: Any, batch: dict[str, Any], rows: int | None, regression: bool) -> tuple[Any, Any]:
    """The summed loss of the batch's first `rows` rows (None: all) and their count. Summed, not the
    model's mean: a step's gradient is then the mean over its rows however they fall into micro-batches
    (an epoch's short last batch or accumulation group) and processes, and repeated rows weigh nothing."""
    import torch

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    losses = row_losses(model(**inputs).logits.float(), batch["labels"], regression)
    rows = losses.shape[0] if rows is None else rows
    return losses[:rows].sum(), torch.tensor(rows, device=losses.device)


class Classification(TaskKind):
    name = "classification"
    head = "classifier"
    problem_type = "single_label_classification"

    def train_loss(self, model: Any, batch: dict[str, Any], rows: int | None = None) -> tuple[Any, Any]:
        return classifier_train_loss(model, batch, rows, regression=False)

    def scorer(self, task: Task, tokenizer: Any) -> Scorer:
        return classifier_scorer(regression=False)

    def scores(self, task: Task, predictions: Any, labels: Any, subjects: Sequence[str] | None) -> dict[str, float]:
        from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

        if (labels < 0).any():
            raise SpartaError(
                f"{task.name}: the labels include -1 (an unlabelled test split): score a labelled split such as validation"
            )
        scores = {"accuracy": float(accuracy_score(labels, predictions))}
        if task.main_metric == "matthews_correlation":
            scores["matthews_correlation"] = float(matthews_corrcoef(labels, predictions))
        if task.main_metric == "combined_score":
            scores["f1"] = float(f1_score(labels, predictions, pos_label=1, zero_division=0))
            scores["combined_score"] = (scores["accuracy"] + scores["f1"]) / 2
        if subjects is not None:
            scores.update(_by_subject(predictions == labels, np.asarray(subjects), task.subject_categories))
        return scores

    def metric_names(self, task: Task) -> tuple[str, ...]:
        extra = {"matthews_correlation": ("matthews_correlation",), "combined_score": ("f1", "combined_score")}
        return ("accuracy", *extra.get(task.main_metric, ()))


class Regression(TaskKind):
    name = "regression"
    head = "classifier"
    label_dtype = "float32"
    problem_type = "regression"

    def train_loss(self, model: Any, batch: dict[str, Any], rows: int | None = None) -> tuple[Any, Any]:
        return classifier_train_loss(model, batch, rows, regression=True)

    def scorer(self, task: Task, tokenizer: Any) -> Scorer:
        return classifier_scorer(regression=True)

    def scores(self, task: Task, predictions: Any, labels: Any, subjects: Sequence[str] | None) -> dict[str, float]:
        from scipy.stats import pearsonr, spearmanr

        predictions, labels = predictions.astype(np.float64), labels.astype(np.float64)
        pearson = float(pearsonr(predictions, labels)[0])
        spearman = float(spearmanr(predictions, labels)[0])
        return {"pearson": pearson, "spearmanr": spearman, "combined_score": (pearson + spearman) / 2}

    def metric_names(self, task: Task) -> tuple[str, ...]:
        return ("pearson", "spearmanr", "combined_score")


class LMChoice(Classification):
    """Multiple choice with no new parameters. Prompts end in "Answer:" and the task's label names
    are the answer letters that follow it (MMLU's A-D)."""

    name = "lm_choice"
    head = "lm"
    trainable = False
    problem_type = None

    def scorer(self, task: Task, tokenizer: Any) -> Scorer:
        return lm_choice_scorer(*choice_tokens(tokenizer, task.label_names or ()))


def choice_tokens(tokenizer: Any, letters: Sequence[str]) -> tuple[list[int], int]:
    """Token ids of the answer letters as they follow "Answer:", and how many special tokens the
    tokenizer appends to a prompt (the scored position is before them)."""
    ids = [tokenizer.encode(f"Answer: {letter}", add_special_tokens=False)[-1] for letter in letters]
    if len(set(ids)) != len(ids):
        raise SpartaError(f"this tokenizer gives the answer letters {letters[0]}-{letters[-1]} the same last token: "
                          "task.head=lm cannot tell them apart; use task.head=classifier")
    plain = tokenizer.encode("Answer:", add_special_tokens=False)
    full = tokenizer.encode("Answer:")
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
    trailing = len(full) - starts[0] - len(plain) if starts else 0
    return ids, trailing


def lm_choice_scorer(choice_ids: list[int], trailing: int = 0) -> Scorer:
    """The argmax of the model's own next-token logits over `choice_ids` (the tokens ` A`..` D`),
    read at the prompt's last token. `trailing` is how many special tokens the tokenizer appends
    after it (BERT's [SEP]: 1, Llama's: 0).

    Only the scored rows go through the output embedding, so memory stays O(batch x vocab)."""
    import torch

    choices = torch.tensor(choice_ids)

    def score(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        mask = batch["attention_mask"]
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        # last non-pad position, whichever side the tokenizer pads on
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1) - trailing
        rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        logits = model.get_output_embeddings()(rows).float()
        return logits[:, choices.to(logits.device)].argmax(-1), None

    return score


IGNORE = -100  # sft.masks.IGNORE: a label the loss skips (not imported: sft/ reads task files through tasks/)


def supervised_token_losses(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """The next-token cross-entropy (fp32) of each supervised position, in row-major order, and where
    they are: the mask [batch, length - 1] of the labels that are on.

    Only those positions' hidden states go through the LM head (`head_rows`): the full-vocabulary logits
    of every position (batch x length x vocabulary, 3 GiB at SmolLM2's 49,152 for 64 rows of 256) are
    never made. The gradient is the same: a masked position's logits get none. The model runs with
    `use_cache=False`: a packed batch (position ids and no attention mask) keeps attention within rows
    only then (sft/packing.py)."""
    import torch

    targets = batch["labels"][:, 1:]
    supervised = targets != IGNORE
    predicting = torch.nn.functional.pad(supervised, (0, 1))  # position t predicts token t + 1; the last predicts none
    inputs = {key: batch[key] for key in ("input_ids", "inputs_embeds", "attention_mask", "position_ids") if key in batch}
    with head_rows(model, predicting):
        logits = model(**inputs, use_cache=False).logits.float()
    return torch.nn.functional.cross_entropy(logits, targets[supervised], reduction="none"), supervised


@contextmanager
def head_rows(model: Any, rows: Any) -> Iterator[None]:
    """Within this, the model's output embeddings (its LM head, whatever wraps the model: PEFT, SpaRTA,
    DDP, FSDP2) see only the hidden states at `rows` (a boolean [batch, length] mask), so its `logits`
    are [rows, vocabulary]. A pre-hook on the head rather than a call of the body and then the head:
    the model's own forward runs, with every wrapper's hooks (DDP's gradient sync, FSDP's gathers)."""
    from accelerate.utils import extract_model_from_parallel

    def pick(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0][rows], *args[1:])

    handle = extract_model_from_parallel(model).get_output_embeddings().register_forward_pre_hook(pick)
    try:
        yield
    finally:
        handle.remove()


def sft_scorer(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """Each row's summed token loss and its supervised tokens (a split's loss is their ratio, not a mean of batch means)."""
    import torch

    losses, supervised = supervised_token_losses(model, batch)
    by_row = torch.zeros(supervised.shape, dtype=torch.float64, device=losses.device)
    by_row[supervised] = losses.double()
    return by_row.sum(-1), supervised.sum(-1)


class SFT(TaskKind):
    """Supervised fine-tuning: the model writes the answer, through the model's own next-token head.

    The loss is a mean over supervised tokens wherever it is taken: a training step weights each
    micro-batch (and process) by its tokens, and a split's loss is its summed token loss over its
    supervised tokens; perplexity is exp(loss)."""

    name = "sft"
    head = "lm"
    token_level = True

    def train_loss(self, model: Any, batch: dict[str, Any], rows: int | None = None) -> tuple[Any, Any]:
        if rows is not None and rows < batch["labels"].shape[0]:  # repeated rows: no supervised tokens
            labels = batch["labels"].clone()
            labels[rows:] = IGNORE
            batch = {**batch, "labels": labels}
        losses, supervised = supervised_token_losses(model, batch)
        return losses.sum(), supervised.sum()

    def scorer(self, task: Task, tokenizer: Any) -> Scorer:
        return sft_scorer

    def recorded(self, task: Task, task_cfg: TaskConfig, rendering: Any = None) -> dict[str, Any]:
        """`format` and `chat` are the training rows' (`rendering`), resolved however task.format was
        left: `sparta generate` and `sparta serve` render prompts by them (generate_cmd.renders_chat)."""
        return {"name": task.name, "kind": self.name, "based_on": task.based_on,
                "format": rendering.format if rendering is not None else task_cfg.format,
                "chat": rendering.chat if rendering is not None else None,
                "loss_on": task_cfg.loss_on or "assistant", "chat_template": task_cfg.chat_template,
                "instruction": task_cfg.instruction}

    def scores(self, task: Task, predictions: Any, labels: Any, subjects: Sequence[str] | None) -> dict[str, float]:
        """`predictions`: each row's summed token loss; `labels`: its supervised tokens."""
        tokens = float(np.asarray(labels, dtype=np.float64).sum())
        loss = float(np.asarray(predictions, dtype=np.float64).sum()) / tokens if tokens else float("nan")
        return {"loss": loss, "perplexity": float(np.exp(min(loss, 700.0)))}

    def metric_names(self, task: Task) -> tuple[str, ...]:
        return ("loss", "perplexity")


def _by_subject(correct: np.ndarray, subjects: np.ndarray, categories: Mapping[str, str]) -> dict[str, float]:
    """Accuracy per category (over its questions, as hendrycks does for MMLU) and per subject."""
    category_of = np.array([categories.get(str(subject), "") for subject in subjects])
    scores = {
        f"accuracy_{category.replace(' ', '_')}": float(correct[category_of == category].mean())
        for category in sorted(set(category_of) - {""})
    }
    for subject in sorted(set(subjects.tolist())):
        scores[f"accuracy_subject_{subject}"] = float(correct[subjects == subject].mean())
    return scores


CLASSIFICATION = Classification()
REGRESSION = Regression()
LM_CHOICE = LMChoice()
SFT_KIND = SFT()
