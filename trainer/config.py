"""One config dataclass per stage (TRL ``reward_config`` style): every field has a help
string, options are ``Literal[...]``, and ``__post_init__`` rejects bad values with a
ValueError naming the field. Configs are unpacked at the edge; inner functions take plain
keyword arguments.

Defaults follow the paper where that is affordable on the CPU default (SmolLM2-135M on
2 cores) and say so in the help when they differ. Importing this module needs no torch
(``rlhf trainer --help`` and the service's start stay fast).
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
TrainMode = Literal["head", "top_layers", "lora", "full"]
HeadKind = Literal["last_token", "pooled"]


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
    batch 64 prompts, a scalar head on the last token. On a CPU a full fine-tune of even a
    135M RM is slow, hence ``train_mode``; the full RM stays available for a GPU
    (``--set train_mode=full``, with ``head=last_token`` for the paper's recipe).

    Default: the whole SFT trunk frozen (``head``; its output is computed once per
    completion and cached) under the ``pooled`` head. Chosen by ``python -m
    bench.reward_curve`` on the embedded model's own samples ranked by simulated labelers
    (docs/BENCHMARKS.md): it beat the last-token head and trained top layers at every data
    size measured, and an epoch costs only the head.
    """

    learning_rate: float = field(
        default=1e-3,
        metadata={"help": "Peak AdamW learning rate for every trainable weight (paper, full 6B: 9e-6; a head "
                  "on a frozen trunk wants ~1e-3, top layers ~3e-4, LoRA ~2e-4)."})
    weight_decay: float = field(
        default=1.0,
        metadata={"help": "AdamW weight decay on matrices (the head's projections): the head has ~10k inputs "
                  "and a few thousand noisy pairs, so it needs a strong prior (measured: 0.1 overfits)."})
    min_lr_ratio: float = field(
        default=1.0,
        metadata={"help": "Cosine decay ends at learning_rate * min_lr_ratio: 1 keeps the rate constant (measured "
                  "better for a head trained a few dozen steps: 0.72 vs 0.68); the paper decays a full RM to 0.1."})
    epochs: int = field(
        default=6,
        metadata={"help": "Passes over the comparisons (paper: 1 for a full RM, which overfits after). A head "
                  "on a cached trunk costs little per epoch and wants several."})
    train_mode: TrainMode = field(
        default="head",
        metadata={"help": "Which weights train: 'head' (the trunk frozen, its output cached: the head only), "
                  "'top_layers' (the top `top_layers` decoder layers, the final norm and the head), 'lora' "
                  "(adapters on the backbone's linear layers, merged for saving; the head trains fully), 'full'."})
    head: HeadKind = field(
        default="pooled",
        metadata={"help": "'pooled': every response token's final state, projected to head_features features "
                  "and max/mean/sum-pooled, beside the last token's state (trainer.rm_heads); 'last_token': "
                  "the paper's linear head on the last token's state."})
    head_features: int = field(default=16, metadata={"help": "Projections the pooled head pools (measured: 64 overfit)."})
    head_ensemble: int = field(
        default=5,
        metadata={"help": "Heads trained side by side from different inits, the score their mean (each its own "
                  "loss): on a few thousand noisy pairs single heads vary with the seed, their mean less "
                  "(bench.reward_curve). On a cached trunk a member costs little."})
    pool_depths: tuple[float, ...] = field(
        default=(0.0, 0.4),
        metadata={"help": "Which hidden states the pooled head pools, as fractions of the depth (0 = the token "
                  "embeddings, 1 = the final states); with several, each token's states at those depths are "
                  "concatenated before the projection. (0.0, 0.4) = the embeddings and layer 12 of SmolLM2's 30: "
                  "what a token is and what it means in context (bench.reward_curve, 64-token samples: beat layer "
                  "12 alone by 0.03-0.07 pairwise accuracy against the rule at 2,000 and 4,000 pairs, under both "
                  "labeler rules measured)."})
    head_last_state: bool = field(
        default=False,
        metadata={"help": "Whether the pooled head also reads the last token's FINAL state. False: it reads only "
                  "the pooled layers, so the trunk runs (and the RM saves) only the layers up to the deepest of "
                  "them: 12 of SmolLM2's 30 at the default depths. Measured (bench.reward_curve, 64-token samples, "
                  "2,000 and 4,000 pairs): as accurate or better under both labeler rules, for about 0.4x the "
                  "trunk's work."})
    top_layers: int = field(default=2, metadata={"help": "Decoder layers trained in train_mode='top_layers'."})
    cache_trunk: bool = field(
        default=True,
        metadata={"help": "train_mode 'head' or 'top_layers': run the frozen layers ONCE per completion and "
                  "reuse their output in every epoch (exact: they do not change; top_layers needs "
                  "residual_dropout = 0). An epoch then costs the head (or the top layers) only."})
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
        _check(self.head_features >= 1, "head_features", "must be >= 1", self.head_features)
        self.pool_depths = tuple(float(d) for d in self.pool_depths)
        _check(len(self.pool_depths) >= 1 and all(0 <= d <= 1 for d in self.pool_depths), "pool_depths",
               "must be one or more fractions in [0, 1]", self.pool_depths)
        _check(self.head_ensemble >= 1, "head_ensemble", "must be >= 1", self.head_ensemble)
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
    the held-out pretraining NLL (the alignment tax) and the win rate's one-sided p-value."""

    max_new_tokens: int = field(default=64, metadata={"help": "Tokens sampled per evaluation prompt."})
    temperature: float = field(
        default=0.0, metadata={"help": "Sampling temperature for evaluation samples; 0 = greedy."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward/generate call."})
    max_prompts: int | None = field(default=64, metadata={"help": "Evaluation prompts used; None = all."})
    ptx_max_length: int = field(
        default=256, metadata={"help": "Tokens per held-out pretraining text for the alignment-tax NLL."})
    kl_samples_per_prompt: int = field(
        default=2,
        metadata={"help": "Samples per evaluation prompt (at PPO's temperature, with PPO's kl_estimator) for the "
                  "candidate's KL to its SFT reference: the KL is measured on the policy's own samples."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    keep_answers: int = field(
        default=3,
        metadata={"help": "Evaluation prompts whose answers (candidate's and serving policy's) and judge scores "
                  "the cycle's record keeps (metrics evaluate.examples), first ones first: for a person reading a "
                  "cycle, and to check a gate's call afterwards, a refusal included (the candidate of a refused "
                  "cycle is deleted). 0 keeps none."})

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1", self.max_new_tokens)
        _check(self.keep_answers >= 0, "keep_answers", "must be >= 0", self.keep_answers)
        _check(self.temperature >= 0, "temperature", "must be >= 0", self.temperature)
        _check(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        _check(self.max_prompts is None or self.max_prompts >= 1, "max_prompts", "must be >= 1 or None",
               self.max_prompts)
        _check(self.ptx_max_length >= 2, "ptx_max_length", "must be >= 2", self.ptx_max_length)
        _check(self.kl_samples_per_prompt >= 1, "kl_samples_per_prompt", "must be >= 1", self.kl_samples_per_prompt)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_PPO_LR = {"full": 2e-5, "lora": 2e-4, "top_layers": 2e-5}  # measured on the 135M model (MACHINE-FACTS)
KLEstimator = Literal["k1", "k2", "k3"]


@dataclass
class PPOConfig:
    """Step 3: PPO-ptx against a frozen RM with a per-token KL penalty to the SFT reference.

    Paper: beta = 0.02, gamma (ptx) = 27.8 under its own normalisation, value function
    initialised from the RM. Defaults are sized for the embedded SmolLM2-135M on a 2-core CPU.
    """

    # -- rollouts
    rollouts_per_iteration: int = field(
        default=16, metadata={"help": "Responses sampled per PPO iteration (samples_per_prompt to each prompt)."})
    iterations: int = field(default=10, metadata={"help": "PPO iterations (rollout + update rounds)."})
    samples_per_prompt: int = field(
        default=1,
        metadata={"help": "Responses sampled per prompt in an iteration (OpenRLHF's n_samples_per_prompt): "
                  "rollouts_per_iteration counts responses and must be a multiple of it."})
    max_new_tokens: int = field(
        default=48, metadata={"help": "Response token cap; a response that hits it has no EOS."})
    temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature (> 0). Log-probs of policy AND reference are taken at this "
                  "temperature, so PPO optimises the distribution it samples from."})
    top_p: float = field(
        default=1.0,
        metadata={"help": "Nucleus sampling; < 1 makes rollouts slightly off-policy (log-probs ignore the cut)."})
    max_prompt_tokens: int = field(
        default=256, metadata={"help": "Prompt tokens kept (the END of a longer prompt is kept)."})
    rollout_engine: Literal["hf", "vllm"] = field(
        default="hf",
        metadata={"help": "Who samples the rollouts: 'hf' (transformers' generate on the policy itself) or 'vllm' "
                  "(vLLM's engine in a child process, its weights synced after each update; +~3.7 GB and ~20 s of "
                  "start-up per run). On 2 CPU cores vLLM was 0.86x HF's speed per iteration on an idle machine and "
                  "1.5x beside a busy core (python -m bench.rollouts, docs/BENCHMARKS.md): 'hf' stays the default."})
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={"help": "Subtracted from the RM score of responses cut at max_new_tokens (the RM was trained "
                  "on responses ending with EOS); None = no penalty."})
    # -- KL penalty
    kl_coef: float = field(
        default=0.05,
        metadata={"help": "beta: per-token reward -beta * log(pi / pi_ref) (paper: 0.02). On the 135M model "
                  "beta = 0.05 still let KL reach 6-8 nats in 12 iterations (MACHINE-FACTS); 0.1 is cleaner."})
    kl_estimator: KLEstimator = field(
        default="k1",
        metadata={"help": "Per-token estimate of KL(pi || pi_ref) from the policy's own samples (Schulman): 'k1' "
                  "log-ratio (unbiased, can be negative: the paper's penalty), 'k2' half its square (biased, low "
                  "variance), 'k3' exp(-r) - 1 + r (unbiased, >= 0). PPO's penalty, the adaptive controller and "
                  "the gate's KL bound all use it."})
    kl_control: Literal["fixed", "adaptive"] = field(
        default="fixed",
        metadata={"help": "'fixed' beta, or 'adaptive' (Ziegler et al. 2019): beta moves to keep the per-sequence "
                  "KL near kl_target."})
    kl_target: float = field(
        default=6.0, metadata={"help": "Target per-sequence KL in nats for kl_control='adaptive'."})
    kl_horizon: int = field(
        default=256,
        metadata={"help": "Adaptive controller horizon in episodes: beta changes by at most 20% * episodes / "
                  "horizon per update (Ziegler: 10000, for runs of millions of episodes)."})
    # -- advantages
    advantage_estimator: Literal["gae", "rloo"] = field(
        default="gae",
        metadata={"help": "'gae': per-token GAE against the value model (initialised from the RM; the paper's "
                  "PPO). 'rloo': each response's KL-penalised return minus the mean return of the other "
                  "responses to its prompt, on all its tokens (REINFORCE leave-one-out, Ahmadian et al. 2024), "
                  "under the same clipped objective; needs samples_per_prompt >= 2, and the value model is "
                  "neither run nor trained."})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount (1.0: the episode is one response)."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    whiten_advantages: bool = field(
        default=True, metadata={"help": "Whiten advantages over the iteration's response tokens."})
    # -- PPO update
    clip_eps: float = field(default=0.2, metadata={"help": "PPO ratio clip epsilon."})
    value_clip_eps: float = field(default=0.2, metadata={"help": "Value clip: V may move this far from V_old."})
    ppo_epochs: int = field(default=2, metadata={"help": "Passes over each iteration's rollouts."})
    minibatch_size: int = field(default=4, metadata={"help": "Rollouts per optimizer step."})
    policy_lr: float | None = field(
        default=None, metadata={"help": "Policy AdamW LR; None = 2e-5 (full) or 2e-4 (lora)."})
    value_lr: float | None = field(
        default=None, metadata={"help": "Value-model AdamW LR; None = same rule as policy_lr."})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Clip each model's gradient norm; None disables clipping."})
    # -- pretraining mix (ptx)
    ptx_coef: float = field(
        default=0.3,
        metadata={"help": "gamma: loss = policy loss + ptx_coef * pretraining NLL, both per-token means "
                  "(gamma = 1 weighs one pretraining token like one RL token); 0 = plain PPO. The paper's 27.8 "
                  "is under an unpublished normalisation: here it would leave ~9% of the RL progress. Calibrated "
                  "on the embedded model (module docstring): 0.3 turns the alignment tax negative and keeps ~95% "
                  "of the RL progress; 1.0 protects more and keeps ~78%."})
    ptx_batch_size: int = field(default=4, metadata={"help": "Pretraining windows per policy step."})
    ptx_seq_len: int = field(default=128, metadata={"help": "Tokens per pretraining window."})
    ptx_held_out_fraction: float = field(
        default=0.1,
        metadata={"help": "With the default corpus, the fraction of paragraphs held out (split seed 0) to measure "
                  "the alignment tax; PPO trains on the rest."})
    # -- which weights train
    train_mode: Literal["full", "lora", "top_layers"] = field(
        default="full",
        metadata={"help": "'full': every policy and value weight trains; 'lora': adapters on lora_targets of both "
                  "(the value head trains fully), merged into full weights when the policy is saved; "
                  "'top_layers': the top `top_layers` decoder layers and the final norm of each (and the value "
                  "head): backward stops below them. Measured (python -m bench.ppo_effect, 2 rules): the demo's "
                  "PPO in 0.61-0.62x the time, its effect on the policy no different within the bench's error."})
    top_layers: int = field(
        default=6, metadata={"help": "Decoder layers that train in train_mode='top_layers' (of the value model's "
                             "trunk, cut at the RM's pooled layer, at most all)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale alpha / r)."})
    lora_targets: tuple[str, ...] = field(
        default=LORA_TARGETS, metadata={"help": "Module names that get LoRA adapters (default: all linear layers)."})
    # -- runtime
    forward_batch_size: int = field(
        default=16, metadata={"help": "Sequences per generate call and per no-grad forward (scoring, log-probs)."})
    seed: int = field(default=0, metadata={"help": "Seed for prompt order, sampling and minibatch shuffles."})
    device: Literal["auto", "cpu", "cuda"] = field(
        default="auto", metadata={"help": "'auto': CUDA when available, else CPU."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={"help": "Frozen models' dtype and the trained models' autocast dtype; 'auto': bf16 on a CUDA "
                  "device that supports it, else fp32. 'bfloat16' on a CPU autocasts there too (CPUs with "
                  "bf16 instructions; python -m bench.ppo_effect measures it)."})
    num_threads: int | None = field(
        default=None, metadata={"help": "torch.set_num_threads during training; None leaves it."})

    def __post_init__(self) -> None:
        self.lora_targets = tuple(self.lora_targets)
        positive_ints = ("rollouts_per_iteration", "iterations", "max_new_tokens", "max_prompt_tokens", "kl_horizon",
                         "ppo_epochs", "minibatch_size", "ptx_batch_size", "ptx_seq_len", "lora_r", "lora_alpha",
                         "forward_batch_size", "samples_per_prompt", "top_layers")
        for name in positive_ints:
            _check(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        _check(self.rollouts_per_iteration % self.samples_per_prompt == 0, "rollouts_per_iteration",
               f"must be a multiple of samples_per_prompt={self.samples_per_prompt}", self.rollouts_per_iteration)
        _check(self.advantage_estimator != "rloo" or self.samples_per_prompt >= 2, "samples_per_prompt",
               "must be >= 2 for advantage_estimator='rloo' (the baseline is the prompt's other responses)",
               self.samples_per_prompt)
        _check(self.temperature > 0, "temperature", "must be > 0 (PPO samples)", self.temperature)
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        _check(self.kl_coef >= 0, "kl_coef", "must be >= 0", self.kl_coef)
        _check(self.kl_target > 0, "kl_target", "must be > 0", self.kl_target)
        _check(0 <= self.gamma <= 1, "gamma", "must be in [0, 1]", self.gamma)
        _check(0 <= self.lam <= 1, "lam", "must be in [0, 1]", self.lam)
        _check(self.clip_eps > 0, "clip_eps", "must be > 0", self.clip_eps)
        _check(self.value_clip_eps > 0, "value_clip_eps", "must be > 0", self.value_clip_eps)
        for name in ("policy_lr", "value_lr", "max_grad_norm"):
            value = getattr(self, name)
            _check(value is None or value > 0, name, "must be > 0 or None", value)
        _check(self.missing_eos_penalty is None or self.missing_eos_penalty >= 0, "missing_eos_penalty",
               "must be >= 0 or None", self.missing_eos_penalty)
        _check(self.ptx_coef >= 0, "ptx_coef", "must be >= 0", self.ptx_coef)
        _check(0 <= self.ptx_held_out_fraction < 1, "ptx_held_out_fraction", "must be in [0, 1)",
               self.ptx_held_out_fraction)
        _check(len(self.lora_targets) >= 1, "lora_targets", "must name at least one module", self.lora_targets)
        _check(self.num_threads is None or self.num_threads >= 1, "num_threads", "must be >= 1 or None",
               self.num_threads)
        _check_literals(self)

    @property
    def resolved_policy_lr(self) -> float:
        return self.policy_lr if self.policy_lr is not None else DEFAULT_PPO_LR[self.train_mode]

    @property
    def resolved_value_lr(self) -> float:
        return self.value_lr if self.value_lr is not None else DEFAULT_PPO_LR[self.train_mode]

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
