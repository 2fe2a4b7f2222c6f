"""One config dataclass per stage (TRL ``reward_config`` style): every field has a help
string, options are ``Literal[...]``, and ``__post_init__`` rejects bad values with a
ValueError naming the field. Configs are unpacked at the edge; inner functions take plain
keyword arguments.

Defaults follow the paper where that is affordable on the CPU default (SmolLM2-135M on
2 cores) and say so in the help when they differ. ``PPOConfig`` lives in ``trainer.ppo``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
TrainMode = Literal["full", "lora", "top_layers"]


def _check(condition: bool, name: str, message: str, value: Any) -> None:
    if not condition:
        raise ValueError(f"{name} {message}, got {value!r}")


def _check_literals(config: Any) -> None:
    """Every ``Literal[...]`` field holds one of its options."""
    hints = get_type_hints(type(config))
    for f in dataclasses.fields(config):
        options = _literal_options(hints[f.name])
        value = getattr(config, f.name)
        if options is not None and value not in options and value is not None:
            raise ValueError(f"{f.name} must be one of {list(options)}, got {value!r}")


def _literal_options(hint: Any) -> tuple[Any, ...] | None:
    if get_origin(hint) is Literal:
        return get_args(hint)
    if get_origin(hint) in (Union, types.UnionType):
        for arg in get_args(hint):
            if get_origin(arg) is Literal:
                return get_args(arg)
    return None


@dataclass
class _OptimConfig:
    """Fields every gradient-based stage shares (AdamW + cosine decay with warmup)."""

    learning_rate: float = field(default=1e-5, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay, applied to matrices only (not norms or biases)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "Fraction of optimizer steps with a linear warmup from 0 to the peak LR."})
    min_lr_ratio: float = field(
        default=0.0, metadata={"help": "Cosine decay ends at learning_rate * min_lr_ratio."})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Clip the global gradient norm to this value; None disables clipping."})
    epochs: int = field(default=1, metadata={"help": "Passes over the training data."})
    seed: int = field(default=0, metadata={"help": "Seed for init, shuffling and dropout."})
    device: Device = field(default="auto", metadata={"help": "'auto': CUDA when available, else CPU."})
    dtype: Dtype = field(
        default="auto", metadata={"help": "'auto': bf16 on a CUDA device that supports it, else fp32."})
    num_threads: int | None = field(
        default=None,
        metadata={"help": "torch.set_num_threads for this stage; None leaves it (in the trainer service, "
                  "share_cpu then picks the count before each epoch). On a shared CPU, leave cores to the "
                  "serving engine."})
    show_progress: bool = field(default=True, metadata={"help": "tqdm progress bars (only when stderr is a TTY)."})

    def _validate_optim(self) -> None:
        _check(self.learning_rate > 0, "learning_rate", "must be > 0", self.learning_rate)
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        _check(0 <= self.adam_beta1 < 1, "adam_beta1", "must be in [0, 1)", self.adam_beta1)
        _check(0 <= self.adam_beta2 < 1, "adam_beta2", "must be in [0, 1)", self.adam_beta2)
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)", self.warmup_ratio)
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "must be > 0 or None",
               self.max_grad_norm)
        _check(self.epochs >= 1, "epochs", "must be >= 1", self.epochs)
        _check(self.num_threads is None or self.num_threads >= 1, "num_threads", "must be >= 1 or None",
               self.num_threads)
        _check_literals(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SFTConfig(_OptimConfig):
    """Step 1: supervised fine-tuning on labeler demonstrations (loss on response tokens only).

    Paper: 16 epochs, cosine LR decay, residual dropout 0.2, checkpoint picked by RM score
    on validation prompts (validation loss overfits after one epoch yet RM score keeps rising).
    """

    learning_rate: float = field(
        default=2e-5, metadata={"help": "Peak AdamW learning rate (paper, 1.3B/6B: 9.65e-6; small models take more)."})
    epochs: int = field(
        default=4, metadata={"help": "Passes over the demonstrations (paper: 16; each is evaluated, best kept)."})
    batch_size: int = field(default=8, metadata={"help": "Demonstrations per optimizer step (paper: 32)."})
    micro_batch_size: int | None = field(
        default=None,
        metadata={"help": "Demonstrations per forward/backward (gradient accumulation); None = batch_size."})
    max_length: int = field(
        default=512, metadata={"help": "Prompt + response tokens; the prompt is cut from the left to fit."})
    max_response_length: int = field(
        default=256, metadata={"help": "Response tokens kept (EOS included); longer responses are cut."})
    residual_dropout: float = field(
        default=0.2,
        metadata={"help": "Dropout on each attention and MLP block's output before it joins the residual "
                  "stream (GPT-2's resid_pdrop; paper: 0.2). Training only; never saved with the model."})
    attention_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on attention probabilities (the HF config field, set while training "
                  "and restored before saving). The paper names only residual dropout."})
    selection_metric: Literal["auto", "rm_score", "val_loss"] = field(
        default="auto",
        metadata={"help": "Which epoch's weights to keep: 'auto' = rm_score when a reward model is given, "
                  "else val_loss."})
    eval_max_new_tokens: int = field(
        default=64, metadata={"help": "Greedy sample length on validation prompts for the RM-score selection."})
    eval_batch_size: int = field(default=8, metadata={"help": "Batch size for validation loss, sampling, scoring."})
    max_eval_prompts: int | None = field(
        default=64, metadata={"help": "Validation prompts sampled and scored per epoch; None = all."})

    def __post_init__(self) -> None:
        self._validate_optim()
        _check(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        _check(self.micro_batch_size is None or 1 <= self.micro_batch_size <= self.batch_size,
               "micro_batch_size", "must be in [1, batch_size] or None", self.micro_batch_size)
        _check(self.max_length >= 2, "max_length", "must be >= 2", self.max_length)
        _check(1 <= self.max_response_length < self.max_length, "max_response_length",
               "must be in [1, max_length)", self.max_response_length)
        _check(0 <= self.residual_dropout < 1, "residual_dropout", "must be in [0, 1)", self.residual_dropout)
        _check(0 <= self.attention_dropout < 1, "attention_dropout", "must be in [0, 1)", self.attention_dropout)
        _check(self.eval_max_new_tokens >= 1, "eval_max_new_tokens", "must be >= 1", self.eval_max_new_tokens)
        _check(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1", self.eval_batch_size)
        _check(self.max_eval_prompts is None or self.max_eval_prompts >= 1, "max_eval_prompts",
               "must be >= 1 or None", self.max_eval_prompts)


@dataclass
class RMConfig(_OptimConfig):
    """Step 2: the reward model from K-way rankings (K = 2..9).

    Each prompt's K completions are ONE batch element: one forward pass per completion and
    all C(K, 2) pairs in the loss. Paper: 6B RM, one epoch, lr 9e-6, cosine decay to 10%,
    batch 64 prompts. On a CPU a full fine-tune of even a 135M RM is slow, hence the
    ``train_mode`` options; the full RM stays available for a GPU (``--set train_mode=full``).

    Default ``top_layers`` (2 of SmolLM2's 30): measured by ``bench.reward_model`` on the
    embedded model (synthetic preference, 24 comparisons x K = 4, one epoch, 72 held-out
    pairs) at 0.83 held-out accuracy vs 0.88 for LoRA and 0.92 for full, with steps ~2.5x
    cheaper than full and ~4x cheaper than LoRA on these CPUs.
    """

    learning_rate: float = field(
        default=1e-4,
        metadata={"help": "Peak AdamW learning rate for every trainable weight (paper, full 6B: 9e-6; "
                  "LoRA and top-layers training want more)."})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "Cosine decay ends at 10% of the peak (paper)."})
    epochs: int = field(default=1, metadata={"help": "Passes over the comparisons (paper: 1; the RM overfits after)."})
    train_mode: TrainMode = field(
        default="top_layers",
        metadata={"help": "Which weights train: 'full' (all), 'lora' (adapters on the backbone's linear layers, "
                  "merged for saving; the head trains fully), 'top_layers' (the top `top_layers` decoder "
                  "layers, the final norm and the head)."})
    top_layers: int = field(default=2, metadata={"help": "Decoder layers trained in train_mode='top_layers'."})
    cache_trunk: bool = field(
        default=True,
        metadata={"help": "train_mode='top_layers': run the frozen lower layers ONCE per completion and reuse "
                  "their output in every epoch (exact: they do not change; needs residual_dropout = 0). "
                  "Makes an epoch about layers/top_layers times cheaper, so several epochs fit on a CPU."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (train_mode='lora')."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout inside the LoRA adapters."})
    batch_size: int = field(
        default=8, metadata={"help": "Prompts (comparisons, each with its K completions) per optimizer step "
                             "(paper: 64)."})
    max_completions_per_step: int = field(
        default=32,
        metadata={"help": "Most sequences in one forward/backward: a step's prompts are split into micro-batches "
                  "of WHOLE prompts under this cap (gradient accumulation). A prompt with more completions "
                  "than the cap still goes in one micro-batch: its K passes are never split."})
    max_length: int = field(
        default=512, metadata={"help": "Prompt + completion tokens; the prompt is cut from the left to fit."})
    max_response_length: int = field(
        default=256, metadata={"help": "Completion tokens kept (EOS included)."})
    residual_dropout: float = field(
        default=0.0, metadata={"help": "Residual dropout while training the RM (the paper names none for the RM)."})
    head_init_std: float | None = field(
        default=None, metadata={"help": "Std of the scalar head's init; None = 1 / sqrt(hidden + 1)."})
    eval_batch_size: int = field(default=16, metadata={"help": "Sequences per forward when scoring."})

    def __post_init__(self) -> None:
        self._validate_optim()
        _check(self.top_layers >= 0, "top_layers", "must be >= 0", self.top_layers)
        _check(self.lora_r >= 1, "lora_r", "must be >= 1", self.lora_r)
        _check(self.lora_alpha >= 1, "lora_alpha", "must be >= 1", self.lora_alpha)
        _check(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)", self.lora_dropout)
        _check(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        _check(self.max_completions_per_step >= 2, "max_completions_per_step", "must be >= 2",
               self.max_completions_per_step)
        _check(self.max_length >= 2, "max_length", "must be >= 2", self.max_length)
        _check(1 <= self.max_response_length < self.max_length, "max_response_length",
               "must be in [1, max_length)", self.max_response_length)
        _check(0 <= self.residual_dropout < 1, "residual_dropout", "must be in [0, 1)", self.residual_dropout)
        _check(self.head_init_std is None or self.head_init_std > 0, "head_init_std", "must be > 0 or None",
               self.head_init_std)
        _check(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1", self.eval_batch_size)


@dataclass
class EvalConfig:
    """Evaluation of a candidate policy: samples, RM win rate, KL to the SFT reference,
    the held-out pretraining NLL (the alignment tax) and the significance test."""

    max_new_tokens: int = field(default=64, metadata={"help": "Tokens sampled per evaluation prompt."})
    temperature: float = field(
        default=0.0, metadata={"help": "Sampling temperature for evaluation samples; 0 = greedy."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward/generate call."})
    max_prompts: int | None = field(default=64, metadata={"help": "Evaluation prompts used; None = all."})
    ptx_max_length: int = field(
        default=256, metadata={"help": "Tokens per held-out pretraining text for the alignment-tax NLL."})
    significance_level: float = field(
        default=0.05, metadata={"help": "One-sided binomial test level for 'candidate beats incumbent'."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1", self.max_new_tokens)
        _check(self.temperature >= 0, "temperature", "must be >= 0", self.temperature)
        _check(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        _check(self.max_prompts is None or self.max_prompts >= 1, "max_prompts", "must be >= 1 or None",
               self.max_prompts)
        _check(self.ptx_max_length >= 2, "ptx_max_length", "must be >= 2", self.ptx_max_length)
        _check(0 < self.significance_level < 1, "significance_level", "must be in (0, 1)",
               self.significance_level)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- overrides


def config_from_overrides(config_cls: type, overrides: typing.Iterable[str] = ()) -> Any:
    """Build ``config_cls`` from ``key=value`` strings (the CLI's ``--set``), typed by its fields.

    Works for any config dataclass (``PPOConfig`` included). Values parse as JSON when the
    field is not a plain string (``none``/``null`` give None, ``true``/``false`` booleans).
    """
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{config_cls!r} is not a dataclass")
    hints = get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    kwargs: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"override must look like key=value, got {item!r}")
        if key not in names:
            raise ValueError(f"Unknown {config_cls.__name__} field: {key} (fields: {', '.join(sorted(names))})")
        kwargs[key] = _parse_value(key, raw.strip(), hints[key])
    return config_cls(**kwargs)


def _parse_value(name: str, raw: str, hint: Any) -> Any:
    args = get_args(hint)
    optional = type(None) in args
    if raw.lower() in ("none", "null"):
        if optional:
            return None
        raise ValueError(f"{name} cannot be None")
    base = [a for a in args if a is not type(None)] if get_origin(hint) in (Union, types.UnionType) else [hint]
    target = base[0] if len(base) == 1 else None
    if target is str or (get_origin(target) is Literal and all(isinstance(o, str) for o in get_args(target))):
        return raw
    if target is bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{name} must be true or false, got {raw!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if target in (int, float) and not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {raw!r}")
    if target is int and isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name} must be an integer, got {raw!r}")
        return int(value)
    return value
