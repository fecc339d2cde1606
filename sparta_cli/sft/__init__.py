"""Supervised fine-tuning data for causal LMs: rows in TRL's formats, answer-only loss labels, packing.

The pipeline, each step a pure function (docs/sft.md):
  read_sft_file / parse_records   rows, validated (formats.py)
  Rendering.of                    how the rows become text, which a run records (formats.py)
  read_prompt_file / parse_prompts  prompts to generate from, validated (formats.py)
  resolve_chat_template           the Jinja text chat rows render with (masks.py)
  tokenize_rows                   ids and labels, the loss on the answer's tokens (masks.py)
  fit_to_length                   truncation, and the rows it drops, counted (packing.py)
  pack, collate_packed            rows end to end, attention kept per row (packing.py)
  collate_padded                  one row a sequence (packing.py)
"""

from sparta_cli.sft.formats import (
    FORMATS,
    ROLES,
    Rendering,
    SftData,
    SftRow,
    parse_prompts,
    parse_records,
    read_prompt_file,
    read_sft_file,
)
from sparta_cli.sft.masks import (
    IGNORE,
    LOSS_ON,
    TokenizedRow,
    generation_prompt,
    render_with_spans,
    resolve_chat_template,
    tokenize_row,
    tokenize_rows,
)
from sparta_cli.sft.packing import OVERLONG, Fitted, PackedRow, collate_packed, collate_padded, fit_to_length, pack

__all__ = [
    "FORMATS", "IGNORE", "LOSS_ON", "OVERLONG", "ROLES", "Fitted", "PackedRow", "Rendering", "SftData", "SftRow", "TokenizedRow",
    "collate_packed", "collate_padded", "fit_to_length", "generation_prompt", "pack", "parse_prompts", "parse_records",
    "read_prompt_file", "read_sft_file",
    "render_with_spans", "resolve_chat_template", "tokenize_row", "tokenize_rows",
]
