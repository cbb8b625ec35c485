"""The run config: typed sections, YAML in, `section.key=value` overrides, validation, YAML out.

Every value is checked here, before torch.distributed starts or a byte of data is read, and every
error names the key (and the file) and says what would work.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, get_type_hints

import yaml

from .dims import LayoutError, ParallelDims, model_parallel_text
from .errors import ConfigError
from .files import atomic_write
from .model.config import ModelConfig


# Megatron-LM's --tokenizer-type names, each with the megatron-core library it loads through
# (magneto_dist/data/tokenizer_types.py loads them), and the data keys that name a tokenizer
# for data.prefixes.
TOKENIZER_TYPES = {
    "SentencePieceTokenizer": "sentencepiece",
    "HuggingFaceTokenizer": "huggingface",
    "GPT2BPETokenizer": "megatron",
    "TikTokenizer": "tiktoken",
    "NullTokenizer": "null",
}
TOKENIZER_KEYS = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "eod_token",
                  "vocab_size")
# The values of each key with a fixed set of them (the model's are model/config.py's, checked
# by ModelConfig itself); validate() checks every one against this table. None is also
# allowed where the field is Optional (data.tokenizer_type: told by the files).
CHOICES = {
    ("data", "tokenizer_type"): tuple(TOKENIZER_TYPES),
    ("data", "tiktoken_pattern"): ("v1", "v2"),
    ("train", "lr_decay_style"): ("cosine", "linear", "constant", "wsd"),
    ("train", "wsd_decay_style"): ("linear", "cosine", "1-sqrt"),
    ("train", "precision"): ("fp32", "bf16", "fp16"),
    ("train", "compile"): ("off", "blocks"),
    ("train", "spike_policy"): ("off", "warn", "rollback"),
    ("parallel", "pipeline_partition"): ("parameters", "layers"),
}


@dataclass
class DataConfig:
    prefixes: List[str] = field(default_factory=list)  # .bin/.idx prefixes; empty = built-in corpus
    weights: Optional[List[float]] = None  # blend weights, one per prefix (None: by size)
    # The tokenizer of data.prefixes, by Megatron-LM's flag names (the built-in corpus has its
    # own sentencepiece model). tokenizer_type None: told by the files (a .model file:
    # SentencePieceTokenizer; a directory with tokenizer.json: HuggingFaceTokenizer; vocab_file
    # + merge_file: GPT2BPETokenizer; a .json list of ranks: TikTokenizer).
    tokenizer_type: Optional[str] = None   # SentencePieceTokenizer | HuggingFaceTokenizer |
                                           # GPT2BPETokenizer | TikTokenizer | NullTokenizer
    tokenizer_model: Optional[str] = None  # .model file, tokenizer directory, or tiktoken .json
    vocab_file: Optional[str] = None       # GPT2BPETokenizer: vocab.json
    merge_file: Optional[str] = None       # GPT2BPETokenizer: merges.txt
    eod_token: Optional[str] = None        # end-of-document token text, for a tokenizer without
                                           # one (or with several end tokens, e.g. Llama 3)
    vocab_size: Optional[int] = None       # NullTokenizer: ids are 0..vocab_size (eod); Tik-
                                           # Tokenizer: cut the vocabulary to this size
    tiktoken_pattern: str = "v2"           # TikTokenizer: Megatron's split pattern (v1 | v2)
    tiktoken_num_special_tokens: int = 1000  # TikTokenizer: ids below this are special tokens
    split: str = "969,30,1"                # train,valid,test proportions of the documents
    cache_dir: str = "data_cache"          # built-in corpus and index caches (per node)
    builtin_vocab_size: int = 8192         # vocabulary of the built-in corpus tokenizer
    loader_workers: int = 0                # torch DataLoader worker processes per rank
    masking_probability: float = 0.15      # masked-LM (BERT) runs only
    # Document masking of packed sequences (GPT runs; Megatron-LM's flags). A training
    # sequence packs several documents separated by the end-of-document token:
    reset_attention_mask: bool = False     # tokens attend only within their own document
                                           # (block-causal; the eod token ends its document)
    reset_position_ids: bool = False       # positions restart at 0 after each eod token
    eod_mask_loss: bool = False            # no loss where the input token is the eod (the
                                           # first token of the next document is not predicted
                                           # from the previous one)


@dataclass
class TrainConfig:
    train_iters: int = 200                 # optimizer steps of the whole run
    exit_at_step: Optional[int] = None     # save and stop at this step (the schedule still
                                           # spans train_iters); for staged runs
    micro_batch_size: int = 8              # samples per rank per forward pass
    global_batch_size: int = 16            # samples per optimizer step, all ranks together
    lr: float = 3e-3                       # peak learning rate
    min_lr: float = 3e-4                   # floor of the decay
    warmup_iters: int = 20                 # linear warm-up from 0 to lr (a run shorter than
                                           # this warms up over all its steps)
    lr_decay_style: str = "cosine"         # cosine | linear | constant | wsd (after warm-up;
                                           # wsd: warm-up, stable at lr, then decay to min_lr
                                           # over the last wsd_decay_iters steps)
    lr_decay_iters: Optional[int] = None   # steps over which lr decays (None: train_iters);
                                           # wsd: the step its decay ends at
    wsd_decay_iters: Optional[int] = None  # wsd: length of the final decay (the cooldown)
    wsd_decay_style: str = "1-sqrt"        # wsd: the cooldown's shape: linear | cosine | 1-sqrt
                                           # (1 - sqrt(progress); Hagele et al. 2024 found it
                                           # the best of these)
    weight_decay: float = 0.1              # AdamW decay on matrices (not norms, biases)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0                 # global grad-norm clip (0 disables)
    z_loss: float = 0.0                    # coefficient of log(Z)^2 per token on the output
                                           # logits (PaLM: 1e-4); in the gradient, not in the
                                           # reported loss (training/tasks.py)
    precision: str = "fp32"                # fp32 | bf16 | fp16 (fp16: GPU only, loss scaling)
    zero_stage: int = 1                    # DeepSpeed ZeRO stage 0-3
    compile: str = "off"                   # off | blocks: torch.compile each transformer
                                           # block (after TP and recompute are applied).
                                           # Off by default: on this project's 2-core CPU it
                                           # gave no speed-up (1.003x the model's eager step)
                                           # for 33-40 s of first compile (3-5 s cached);
                                           # meant for long GPU runs
    seed: int = 1234                       # model init, data order, dropout
    eval_interval: int = 50                # validate every N steps and at the end (0: never)
    eval_iters: int = 4                    # global batches per validation
    log_interval: int = 10                 # metrics every N steps
    max_nonfinite_steps: int = 3           # consecutive steps with a non-finite loss or grad
                                           # norm (each skipped, not applied) before the run
                                           # stops with exit code 4
    # Loss spikes and silent corruption (README "Self-healing"; training/spikes.py is the rule)
    spike_policy: str = "warn"             # off | warn (a "spike" metrics row) | rollback (back
                                           # to the last checkpoint, replay; a spike that
                                           # recurs there skips a window of data)
    spike_window: int = 10                 # a spike is judged against the previous this-many
                                           # steps (after the LR warm-up)
    spike_loss_rise: float = 1.0           # a spike: the loss this many nats above the window's
                                           # median (this CPU's tiny runs: ~0.2 nats of noise)
    spike_mad_factor: float = 4.0          # ... and this many robust standard deviations
                                           # (1.4826 x MAD) above it
    spike_grad_norm_factor: float = 10.0   # or the grad norm this many times its window's
                                           # median (and as many deviations of its log); 0 off
    spike_skip_steps: int = 20             # rollback: a spike that recurs on the replay skips
                                           # this many global batches around it (PaLM skipped
                                           # 200-500); a third spike within this many steps
                                           # stops the run (exit code 5)
    spike_max_skips: int = 4               # rollback: windows a run may skip; its training
                                           # split is built longer by that many (no sample
                                           # changes its index), one more stops the run
    replay_tolerance: float = 0.0          # rollback: the first replayed step re-runs the
                                           # same batch from the same state; a relative
                                           # difference above this from its first loss is a
                                           # hardware fault (exit code 6). 0: bit for bit
    replica_check_interval: int = 0        # every N steps compare the digests of the data-
                                           # parallel replicas' parameters (0: off); see README
                                           # for the measured cost

    @property
    def last_step(self) -> int:
        """The step this run stops (and saves) at: exit_at_step, else train_iters."""
        return self.exit_at_step or self.train_iters


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1    # TP degree (megatron-core layers)
    pipeline_model_parallel_size: int = 1  # PP degree (DeepSpeed PipelineModule)
    context_parallel_size: int = 1         # CP degree: each rank of a CP group holds 1/CP of
                                           # every sequence (a head and a tail chunk, for an
                                           # even causal load) and attention runs as a ring
                                           # over the group (parallel/context_parallel.py)
    pipeline_partition: str = "parameters"  # balance stages by parameters | layers
    activation_checkpointing: bool = False  # recompute each layer in backward
    sequence_parallel: bool = False        # with TP: the regions outside the TP GEMMs (outer
                                           # norms, dropout, residual adds, the embeddings'
                                           # output) hold 1/TP of the sequence per rank
                                           # (Megatron's --sequence-parallel)
    vocab_padding_multiple: int = 128      # vocab padded to a multiple of this x TP
    timeout_minutes: int = 30              # how long a collective waits for the slowest rank
                                           # before the process group gives up (DeepSpeed's
                                           # default, 10, is shorter than a large model's
                                           # first checkpoint save)


@dataclass
class CheckpointConfig:
    save_interval: int = 100               # save every N steps (0: only at the end)
    keep_last: int = 2                     # complete checkpoints kept
    resume: str = "auto"                   # auto (newest complete, if any) | none | a tag
    init_from: str = ""                    # start from a consolidated export's weights
                                           # (tools/convert_checkpoint.py --to safetensors):
                                           # fresh optimizer, step 0; unused when resuming
    async_save: bool = False               # copy the state to host memory and write it in the
                                           # background while training goes on (a host copy
                                           # of each rank's checkpoint; see README)
    resume_skip_batches: int = 0           # resuming from the tag checkpoint.resume names,
                                           # skip this many global batches of data first (a
                                           # skip by hand past bad data, as the rollback
                                           # policy's own skip does; recorded in the metrics)


@dataclass
class LoggingConfig:
    run_dir: str = "runs/gpt_tiny"         # metrics, TensorBoard, checkpoints, resolved config
    tensorboard: bool = True
    peak_tflops: Optional[float] = None    # per-device peak for MFU (None: table by device)
    sample_prompt: str = "def "            # prompt of the sample printed at the end ("" skips)
    sample_tokens: int = 48
    diagnostics_interval: int = 0          # every N steps (and at step 0): per-layer grad norms,
                                           # update ratios, residual RMS, model update (0: off)
    straggler_interval: int = 50           # every N steps: name a rank that keeps its peers
                                           # waiting (0: off; README "Seeing inside a run")
    straggler_margin: float = 0.5          # named when its delay makes the step 1 + this times
                                           # as long as without it (training/stragglers.py
                                           # says why 0.5; lower it on dedicated GPUs)
    profile_steps: str = ""                # torch.profiler over steps "A-B" (or "A") on every
                                           # rank, a trace each in RUN_DIR/profile ("": off)
    profile_stacks: bool = False           # the profile records Python stacks too (bigger)
    memory_snapshot: bool = False          # CUDA: the allocator's history over the profile
                                           # window, a snapshot at its end and on out-of-memory

    @property
    def profile_window(self) -> Optional[Tuple[int, int]]:
        """(first, last) step of logging.profile_steps, None when off (validate() checked it)."""
        return step_range(self.profile_steps)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # DeepSpeed config keys merged into the one the project generates (training/engine.py):
    # ZeRO-Offload, overlap_comm, bucket sizes, ... Checked by DeepSpeed's own config class
    # before any process group forms; a key the project derives from the sections above is
    # refused by name. Overrides nest: deepspeed.zero_optimization.overlap_comm=true
    deepspeed: Dict[str, Any] = field(default_factory=dict)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))
FREE_FORM = "deepspeed"  # the section that is a mapping passed on, not typed keys
# string keys with an `off` choice, which YAML reads as False
ON_OFF_KEYS = ("train.compile", "train.spike_policy")
STEP_RANGE_KEYS = ("logging.profile_steps",)  # "A-B" string keys, where YAML reads "A" as an int


def step_range(text: str) -> Optional[Tuple[int, int]]:
    """"A-B" or "A" -> (A, B) (B = A); "" -> None; ValueError for anything else."""
    if not text:
        return None
    first, dash, last = text.partition("-")
    first, last = int(first), int(last) if dash else int(first)
    if not 1 <= first <= last:
        raise ValueError(text)
    return first, last


def _coerce(key: str, value: Any, hint) -> Any:
    """Check a YAML value against the field's annotation (ints for floats are fine)."""
    origin = getattr(hint, "__origin__", None)
    args = getattr(hint, "__args__", ())
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{key} may not be null")
    if origin is not None and type(None) in args:  # Optional[X]
        hint = next(a for a in args if a is not type(None))
        return _coerce(key, value, hint)
    if getattr(hint, "__origin__", None) in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list")
        (item,) = hint.__args__
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # PyYAML reads 3e-4 (no dot) as a string: YAML 1.1's float needs one
            return float(value)
        except ValueError:
            pass
    if key in STEP_RANGE_KEYS and type(value) is int:
        return str(value)
    if key in ON_OFF_KEYS and isinstance(value, bool):
        return "on" if value else "off"  # YAML 1.1 reads off/on as booleans; validate() checks
    if hint in (int, float, str, bool) and not (type(value) is hint):
        raise ConfigError(f"{key}={value!r} must be {hint.__name__}")
    return value


def section_from_dict(name: str, values: dict, base):
    if not isinstance(values, dict):
        raise ConfigError(f"section {name!r} must be a mapping of keys to values")
    if name == FREE_FORM:
        return copy.deepcopy(values)
    cls = type(base)
    hints = get_type_hints(cls)
    kwargs = dataclasses.asdict(base)
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown key {name}.{key}; known keys in {name}: "
                              f"{', '.join(sorted(hints))}")
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    try:
        return cls(**kwargs)
    except ValueError as err:  # ModelConfig validates itself and names model.<field>
        raise ConfigError(str(err)) from None


def config_from_dict(raw: dict) -> Config:
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(sorted(unknown))}; sections are "
                          f"{', '.join(SECTIONS)}")
    default = Config()
    return Config(**{name: section_from_dict(name, raw.get(name) or {}, getattr(default, name))
                     for name in SECTIONS})


def apply_override(raw: dict, override: str) -> None:
    """`section.key=value`; the value is parsed as YAML (numbers, booleans, lists, null)."""
    if "=" not in override or "." not in override.split("=", 1)[0]:
        raise ConfigError(f"override {override!r} is not section.key=value (e.g. train.lr=1e-3)")
    dotted, text = override.split("=", 1)
    section, key = dotted.split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"override {override!r}: unknown section {section!r}; sections are "
                          f"{', '.join(SECTIONS)}")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({err})") from None
    raw[section] = copy.deepcopy(raw.get(section) or {})
    target, path = raw[section], key.split(".") if section == FREE_FORM else [key]
    for part in path[:-1]:  # deepspeed.zero_optimization.overlap_comm=true nests
        if not isinstance(target.get(part, {}), dict):
            raise ConfigError(f"override {override!r}: {section}.{part} is not a mapping")
        target = target.setdefault(part, {})
    target[path[-1]] = value


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist (see configs/)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def _blame(err: ConfigError, path: Optional[str], overrides: List[str]) -> ConfigError:
    """Name the override whose key the error is about, else the file it came from."""
    for override in reversed(overrides):
        dotted = override.split("=", 1)[0]
        if re.search(rf"(?<![\w.]){re.escape(dotted)}(?![\w])", str(err)):
            return ConfigError(f"override {override!r}: {err}")
    return ConfigError(f"{path}: {err}" if path else str(err))


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """The config from a YAML file (or the defaults) plus overrides, validated. An error names
    the override whose key it is about, or else the file."""
    raw = _read_yaml(path) if path is not None else {}
    overrides = list(overrides or [])
    for override in overrides:
        apply_override(raw, override)
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        raise _blame(err, path, overrides) from None


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str) -> None:
    """Write the resolved config atomically."""
    atomic_write(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def with_vocab_size(cfg: Config, vocab_size: int) -> Config:
    """The run's config with the model's vocabulary set from its tokenizer: a new Config (the
    model config revalidates itself), so no holder of the loaded one sees it change."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))


def min_zero_stage(precision: str) -> int:
    """The lowest ZeRO stage a precision trains with: bf16 accumulates and reduces gradients in
    fp32 (training/engine.py GRADIENT_DTYPE), which DeepSpeed does only in its ZeRO and bf16
    optimizers (runtime/engine.py: NotImplementedError without ZeRO)."""
    return 1 if precision == "bf16" else 0


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _either(values) -> str:
    """("a", "b", "c") -> "a, b or c"."""
    return " or ".join(filter(None, [", ".join(values[:-1]), values[-1]]))


def _check_choices(cfg: Config) -> None:
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        _require(value in allowed or value is None,
                 f"{section}.{key}={value!r} must be {_either(allowed)}")


def validate(cfg: Config, world_size: int, has_cuda: bool = False) -> ParallelDims:
    """Cross-field checks that need the world size; returns the run's validated layout, which
    everything after reads its DP size and accumulation from."""
    t, p, m = cfg.train, cfg.parallel, cfg.model
    try:
        dims = ParallelDims.of(cfg, world_size)
    except LayoutError as err:
        raise ConfigError(str(err)) from None
    _check_choices(cfg)
    tp, pp = dims.tp, dims.pp
    _require(m.num_heads % tp == 0, f"parallel.tensor_model_parallel_size={tp} does not divide "
             f"model.num_heads={m.num_heads}; use a TP size that divides it")
    _require(m.ffn_hidden_size % tp == 0, f"parallel.tensor_model_parallel_size={tp} does not "
             f"divide model.ffn_hidden_size={m.ffn_hidden_size}")
    _require(m.query_groups % tp == 0, f"parallel.tensor_model_parallel_size={tp} does not "
             f"divide model.num_query_groups={m.num_query_groups}: tensor parallelism gives "
             "each rank whole key/value groups (with the query heads they serve); use a TP size "
             "that divides it, or more groups")
    _require(pp <= m.num_layers, f"parallel.pipeline_model_parallel_size={pp} is more stages "
             f"than model.num_layers={m.num_layers}; use at most {m.num_layers} stages")
    _require(pp <= 2 or m.parametrization != "mup", f"parallel.pipeline_model_parallel_size={pp}"
             " with model.parametrization='mup': a middle stage holds no embedding or head, so "
             "its optimizer would lack muP's group for them, and DeepSpeed pairs a checkpoint's "
             "parameter groups with a run's by position; use at most 2 pipeline stages (or more "
             "TP or DP) with muP")
    _require(pp == 1 or m.arch == "decoder", f"parallel.pipeline_model_parallel_size={pp}: "
             f"pipeline parallelism supports model.arch='decoder' only (got {m.arch!r})")
    _require(0 <= t.zero_stage <= 3, f"train.zero_stage={t.zero_stage} must be 0, 1, 2 or 3")
    _require(pp == 1 or t.zero_stage <= 1,
             f"train.zero_stage={t.zero_stage} with parallel.pipeline_model_parallel_size={pp}: "
             "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only; use train.zero_stage=1 "
             "(or drop pipeline parallelism to use ZeRO-2/3)")
    _validate_context_parallel(cfg, dims)
    _validate_sequence_parallel(cfg, dims)
    _require(p.vocab_padding_multiple >= 1, "parallel.vocab_padding_multiple must be at least 1")
    _require(t.train_iters >= 1, f"train.train_iters={t.train_iters} must be at least 1")
    _require(t.exit_at_step is None or 1 <= t.exit_at_step <= t.train_iters,
             f"train.exit_at_step={t.exit_at_step} must be between 1 and "
             f"train.train_iters={t.train_iters}")
    _validate_wsd(t)
    _require(t.z_loss >= 0, f"train.z_loss={t.z_loss} must be at least 0")
    _require(0 <= t.min_lr <= t.lr, f"train.min_lr={t.min_lr} must be between 0 and train.lr")
    _require(t.warmup_iters >= 0, f"train.warmup_iters={t.warmup_iters} must be at least 0")
    _require(t.max_nonfinite_steps >= 1,
             f"train.max_nonfinite_steps={t.max_nonfinite_steps} must be at least 1")
    _validate_healing(cfg)
    _require(t.precision != "fp16" or has_cuda, "train.precision='fp16' needs a GPU (fp16 has "
             "no fast CPU kernels); use fp32 on CPU, bf16 or fp16 on GPU")
    _require(t.zero_stage >= min_zero_stage(t.precision), "train.precision='bf16' with "
             "train.zero_stage=0: bf16 gradients are accumulated and reduced in fp32, which "
             "DeepSpeed does only in its ZeRO and bf16 optimizers; use train.zero_stage=1 (it "
             "also holds less optimizer state than ZeRO-0)")
    _require(p.timeout_minutes >= 1,
             f"parallel.timeout_minutes={p.timeout_minutes} must be at least 1")
    _require(t.eval_interval == 0 or t.eval_iters >= 1,
             f"train.eval_iters={t.eval_iters} must be at least 1 when eval_interval is set")
    for name in ("eval_interval", "log_interval"):
        _require(getattr(t, name) >= 0, f"train.{name} must be >= 0")
    _require(t.log_interval >= 1, "train.log_interval must be at least 1")
    _validate_data_logging_checkpoint(cfg, dims)
    _validate_observation(cfg.logging, t, has_cuda)
    return dims


def _validate_wsd(t: TrainConfig) -> None:
    if t.lr_decay_style != "wsd":
        _require(t.wsd_decay_iters is None, f"train.wsd_decay_iters={t.wsd_decay_iters} is only "
                 f"used by train.lr_decay_style=wsd (it is {t.lr_decay_style!r})")
        return
    span = (t.lr_decay_iters or t.train_iters) - min(t.warmup_iters, t.train_iters)
    _require(t.wsd_decay_iters is not None, "train.lr_decay_style=wsd needs "
             "train.wsd_decay_iters: the length of the final decay (e.g. a fifth of "
             "train.train_iters)")
    _require(1 <= t.wsd_decay_iters <= span, f"train.wsd_decay_iters={t.wsd_decay_iters} must "
             f"be between 1 and the {span} steps between the warm-up and the decay's end "
             "(train.lr_decay_iters, else train.train_iters)")


def _validate_observation(g: LoggingConfig, t: TrainConfig, has_cuda: bool) -> None:
    """The straggler check, the profile window and the memory snapshot."""
    _require(g.straggler_interval >= 0,
             f"logging.straggler_interval={g.straggler_interval} must be >= 0 (0: off)")
    _require(g.straggler_margin > 0,
             f"logging.straggler_margin={g.straggler_margin} must be > 0 (0.5: a rank is named "
             "when its delay makes every step half as long again)")
    try:
        window = g.profile_window
    except ValueError:
        raise ConfigError(f"logging.profile_steps={g.profile_steps!r} must be FIRST-LAST or one "
                          "step, counted from 1 (e.g. 5-7), or empty (off)") from None
    _require(window is None or window[1] <= t.train_iters,
             f"logging.profile_steps={g.profile_steps!r} ends after train.train_iters="
             f"{t.train_iters}; profile steps within the run")
    _require(not g.memory_snapshot or window is not None, "logging.memory_snapshot=true records "
             "over the profile window: set logging.profile_steps too (e.g. 1-2 to catch the "
             "first steps' peak or an out-of-memory error in them)")
    _require(not g.memory_snapshot or has_cuda, "logging.memory_snapshot=true records the CUDA "
             "caching allocator, and this machine has no GPU; drop it (on CPU, the profile "
             "window's trace shows each operator's time and shapes)")


def _validate_healing(cfg: Config) -> None:
    """The spike and replica-check keys (train.spike_*, replica_check_interval)."""
    t, c = cfg.train, cfg.checkpoint
    _require(t.spike_window >= 3, f"train.spike_window={t.spike_window} must be at least 3 (a "
             "median and a deviation need a few steps)")
    for name in ("spike_loss_rise", "spike_mad_factor", "spike_grad_norm_factor",
                 "replay_tolerance"):
        _require(getattr(t, name) >= 0, f"train.{name}={getattr(t, name)} must be >= 0")
    _require(t.spike_grad_norm_factor == 0 or t.spike_grad_norm_factor > 1,
             f"train.spike_grad_norm_factor={t.spike_grad_norm_factor} must be above 1 (a "
             "multiple of the median grad norm), or 0 to judge the loss only")
    _require(t.spike_skip_steps >= 1 and t.spike_max_skips >= 0,
             f"train.spike_skip_steps={t.spike_skip_steps} must be at least 1 and "
             f"train.spike_max_skips={t.spike_max_skips} at least 0")
    _require(t.replica_check_interval >= 0,
             f"train.replica_check_interval={t.replica_check_interval} must be >= 0")
    healing = [f"train.spike_policy=rollback"] * (t.spike_policy == "rollback") + \
        [f"train.replica_check_interval={t.replica_check_interval}"] * bool(
            t.replica_check_interval)
    _require(not healing or c.save_interval > 0, f"{' and '.join(healing)} with "
             "checkpoint.save_interval=0: there would be no checkpoint to roll back to; set "
             "checkpoint.save_interval > 0")
    _require(c.resume_skip_batches >= 0,
             f"checkpoint.resume_skip_batches={c.resume_skip_batches} must be >= 0")
    _require(not c.resume_skip_batches or c.resume not in ("auto", "none"),
             f"checkpoint.resume_skip_batches={c.resume_skip_batches} needs checkpoint.resume "
             "set to the tag to skip from (e.g. global_step400), not "
             f"{c.resume!r}: a skip after whichever tag is newest would repeat at every restart")


def _validate_context_parallel(cfg: Config, dims: ParallelDims) -> None:
    """Context parallelism and document masking: what the ring attention and the block-causal
    kernel support (parallel/context_parallel.py, model/attention.py)."""
    m, d, cp = cfg.model, cfg.data, dims.cp
    masking = d.reset_attention_mask or d.reset_position_ids or d.eod_mask_loss
    _require(not masking or m.arch == "decoder", f"data.reset_attention_mask, "
             f"reset_position_ids and eod_mask_loss are for packed GPT sequences "
             f"(model.arch='decoder'); got model.arch={m.arch!r}: set them to false")
    _require(not d.reset_attention_mask or m.dropout == 0.0,
             f"data.reset_attention_mask=true with model.dropout={m.dropout}: the block-causal "
             "attention kernel used on GPUs (FlexAttention) has no attention dropout; set "
             "model.dropout=0")
    if cp == 1:
        return
    key = f"parallel.context_parallel_size={cp}"
    _require(m.arch == "decoder", f"{key}: context parallelism supports model.arch='decoder' "
             f"only (got {m.arch!r}); use parallel.context_parallel_size=1, or tensor "
             "parallelism to split the model")
    _require(m.max_seq_len % (2 * cp) == 0, f"{key}: model.max_seq_len={m.max_seq_len} must "
             f"split into 2 x CP = {2 * cp} equal chunks (each rank holds a head and a tail "
             f"chunk); use a sequence length that is a multiple of {2 * cp}")
    _require(m.dropout == 0.0, f"{key} with model.dropout={m.dropout}: the ring attention "
             "computes attention block by block and has no attention dropout; set "
             "model.dropout=0 (or parallel.context_parallel_size=1)")
    _require(cfg.logging.diagnostics_interval == 0, f"{key}: logging.diagnostics_interval "
             "needs the whole sequence on one rank; set it to 0")


def _validate_sequence_parallel(cfg: Config, dims: ParallelDims) -> None:
    """Sequence parallelism splits what a rank of a TP group holds of each sequence (all of it,
    or its CP chunks) into TP parts. Without TP it is an error, not Megatron's silent no-op:
    a run asking for SP at TP1 would otherwise report a layout it does not have."""
    p, m, tp, cp = cfg.parallel, cfg.model, dims.tp, dims.cp
    if not p.sequence_parallel:
        return
    _require(tp > 1, "parallel.sequence_parallel=true needs tensor parallelism (it splits the "
             "TP group's replicated regions along the sequence) but "
             "parallel.tensor_model_parallel_size=1: set tensor_model_parallel_size to 2 or "
             "more, or sequence_parallel=false")
    local = f"model.max_seq_len={m.max_seq_len}" + (f" / parallel.context_parallel_size={cp}"
                                                     if cp > 1 else "")
    _require(m.max_seq_len % (cp * tp) == 0,
             f"parallel.sequence_parallel=true splits each rank's sequence ({local}) across the "
             f"parallel.tensor_model_parallel_size={tp} ranks, but it is not divisible by {tp}; "
             f"use a model.max_seq_len that is a multiple of {cp * tp}")


def _validate_data_logging_checkpoint(cfg: Config, dims: ParallelDims) -> None:
    d, t = cfg.data, cfg.train
    named = [k for k in TOKENIZER_KEYS if getattr(d, k) is not None]
    _require(not d.prefixes or d.tokenizer_model or d.vocab_file
             or d.tokenizer_type == "NullTokenizer", "data.prefixes needs data.tokenizer_model "
             "(or data.vocab_file and data.merge_file): the tokenizer the data was preprocessed "
             "with")
    _require(d.prefixes or not named, f"{', '.join('data.' + k for k in named)} set without "
             "data.prefixes: the built-in corpus has its own sentencepiece tokenizer; give "
             "data.prefixes made with this tokenizer (tools/preprocess_data.py)")
    _require(d.weights is None or len(d.weights) == len(d.prefixes),
             f"data.weights has {len(d.weights or [])} entries but data.prefixes has "
             f"{len(d.prefixes)}; give one weight per prefix")
    parts = d.split.split(",")
    _require(len(parts) == 3 and all(x.strip().replace(".", "", 1).isdigit() for x in parts),
             f"data.split={d.split!r} must be three comma-separated numbers (train,valid,test)")
    interval = cfg.logging.diagnostics_interval
    _require(interval >= 0, "logging.diagnostics_interval must be >= 0")
    _require(not interval or (dims.model_parallel == 1 and t.zero_stage <= 2),
             f"logging.diagnostics_interval={interval} needs the whole model on one rank (TP1 x "
             f"PP1, ZeRO 0-2); this run is {model_parallel_text(dims.layout)}, ZeRO-"
             f"{t.zero_stage}: set it to 0 or measure a TP1 x PP1 run")
    c = cfg.checkpoint
    _require(c.keep_last >= 1, f"checkpoint.keep_last={c.keep_last} must be at least 1")
    _require(c.save_interval >= 0, "checkpoint.save_interval must be >= 0")
    ds_checkpoint = cfg.deepspeed.get("checkpoint")
    writer = ds_checkpoint.get("writer") if isinstance(ds_checkpoint, dict) else None
    _require(not (c.async_save and writer), "checkpoint.async_save=true writes the checkpoint "
             "files with the project's background writer, which takes the place of DeepSpeed's "
             "deepspeed.checkpoint.writer; drop that key, or set checkpoint.async_save=false")
