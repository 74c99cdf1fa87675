"""KTO training as one recipe, top to bottom: setup -> train_step -> the loop -> save.

    setup       data (tokenized examples + their reference log-prob columns), model (4-bit base +
                LoRA, the reference is the same model with the adapters off), optimizer, schedule
    train_step  for each micro-batch: policy log-probs -> z0 -> kto_loss -> backward;
                then clip, optimizer step, log
    the loop    steps planned once, checkpoints, eval, graceful stop
    save        the adapter, status.json and a summary

accelerate provides devices, DDP (`accelerate launch` / `torchrun`), mixed precision (with a loss
scaler for fp16) and no-sync accumulation; transformers provides the LR schedules. Checkpoints are
ours because they hold only the adapter and optimizer state (accelerate's save_state would copy the
4-bit base).
"""

from __future__ import annotations

import math
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from kto_lite.config import TrainConfig, resolve_optimizer
from kto_lite.data import TokenizedExample, load_data, tokenize
from kto_lite.data.lengths import check_lengths
from kto_lite.data.report import complete_weights
from kto_lite.errors import ConfigError
from kto_lite.hub import check_hub_access, push_run, write_model_card
from kto_lite.model import (
    add_lora,
    check_precision,
    choose_precision,
    load_base,
    load_tokenizer,
    no_grad_policy,
    reference_mode,
)
from kto_lite.runs import RunDir, load_checkpoint, prepare_output_dir, read_metrics
from kto_lite.training.batching import Rows, collate, collate_shared, epoch_batches, kl_partners
from kto_lite.training.fsdp import check_launch, parallel
from kto_lite.training.head import output_head
from kto_lite.training.humanline import Humanline
from kto_lite.training.judged import JudgedEvaluation
from kto_lite.training.judged import summary_lines as judged_summary_lines
from kto_lite.training.layout import decide_layout
from kto_lite.training.logps import PolicyLogps
from kto_lite.training.loss import kto_loss, z0_estimate
from kto_lite.training.metrics import Meter, peak_memory_mb
from kto_lite.training.reference import (
    REFERENCE_BATCH_MULTIPLIER,
    cached_reference_logps,
    default_cache_dir,
    model_fingerprint,
)

OOM_ADVICE = ("out of GPU memory. Lower batch_size (and raise gradient_accumulation_steps to keep the "
              "effective batch), lower max_length / max_prompt_length, keep gradient_checkpointing and "
              "load_in_4bit on, or lower lora_r. `python -m kto_lite estimate` predicts what fits.")
NONFINITE_ADVICE = ("the loss or the gradients were not finite for {n} steps in a row, so training stopped "
                    "instead of learning from NaN. Lower learning_rate, try mixed_precision: no (or bf16 on a "
                    "GPU that has it), and check the data report for extreme rows.")
MAX_SKIPPED_STEPS = 5  # non-finite steps in a row before the run stops
MAX_SKIPPED_STEPS_FP16 = 20  # fp16's loss scaler halves its scale on each overflow: allow it to settle


# ====================================================================== data: examples + reference columns
@dataclass
class Split:
    """Tokenized examples and their reference log-prob columns, computed before training.

    Each epoch pairs every example with another one's completion (its KL row, for z0); the pairing
    and its reference column are per epoch. Columns are None when references are computed on the fly.
    """

    examples: list[TokenizedExample]
    kl_partners: list[list[int]] = field(default_factory=list)  # [epoch][i]: the example whose completion i borrows
    reference_logps: torch.Tensor | None = None  # (N,) log pi_ref(y_i | x_i)
    reference_kl_logps: list[torch.Tensor] = field(default_factory=list)  # [epoch] (N,) log pi_ref(y_partner | x_i)


@dataclass
class MicroBatch:
    rows: Rows  # the examples; shared: each prompt once with the example's and the KL partner's completion
    kl_rows: Rows | None  # each example's prompt + its KL partner's completion (None: shared, or no z0 needed)
    labels: torch.Tensor  # (B,) bool, True = desirable
    reference_logps: torch.Tensor | None  # (B,) from the split's column, or None: computed now
    reference_kl_logps: torch.Tensor | None  # (B,)
    shared: bool = False  # rows is batching.collate_shared's: sequences 0..B-1 the examples, B..2B-1 the KL rows
    counted: bool = True  # False: a stand-in that keeps the processes in step and adds nothing (evaluation)

    def __len__(self) -> int:
        return len(self.labels)

    def kl_completion_lengths(self) -> torch.Tensor:
        """(B,) tokens of each KL row's completion (0 where max_length cut it away)."""
        return self.rows.completion_lengths()[len(self):] if self.shared else self.kl_rows.completion_lengths()


def split_by_prompt(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval) with `fraction` of the *prompts* held out: all answers to one prompt stay together."""
    prompts = sorted({repr(e.prompt) for e in examples})
    random.Random(seed).shuffle(prompts)
    held_out = set(prompts[: max(1, int(len(prompts) * fraction))])
    return [e for e in examples if repr(e.prompt) not in held_out], [e for e in examples if repr(e.prompt) in held_out]


def plan_steps(epoch_plan, batches_per_epoch: int, config: TrainConfig) -> list[list[tuple[int, list[int]]]]:
    """The whole run's optimizer steps, each a list of (epoch, example indices) micro-batches.

    Exactly num_epochs x batches_per_epoch micro-batches (the last step may hold fewer), or
    max_steps full steps: never a micro-batch of an epoch that is not trained (which would cost a
    whole extra KL reference pass).
    """
    gas = config.gradient_accumulation_steps
    n_micro = config.max_steps * gas if config.max_steps else max(1, round(config.num_epochs * batches_per_epoch))
    n_epochs = math.ceil(n_micro / batches_per_epoch)
    micro = [(epoch, batch) for epoch in range(n_epochs) for batch in epoch_plan(epoch)][:n_micro]
    return [micro[i : i + gas] for i in range(0, len(micro), gas)]


class Recipe:
    """One training run. `setup` builds everything; `fit` runs the loop. Read top to bottom."""

    def __init__(self, config: TrainConfig, accelerator: Accelerator, run: RunDir, show_progress: bool = True):
        self.config, self.accelerator, self.run = config, accelerator, run
        self.show_progress = show_progress and accelerator.is_local_main_process
        self.stop_requested = False  # set by SIGINT/SIGTERM (see `train`)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, run = self.config, self.run
        set_seed(cfg.seed)
        # judged evaluation (eval_prompts + judge, training/judged.py): a judge that cannot work fails here, not later
        self.judged = JudgedEvaluation.from_config(cfg, run, self.accelerator, self.show_progress)
        # data: read, report, tokenize (every process does the same, deterministically)
        self.tokenizer = load_tokenizer(cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        examples, report = load_data(cfg.data, cfg.columns)
        eval_examples = load_data(cfg.eval_data, cfg.columns)[0] if cfg.eval_data else None
        if eval_examples is None and cfg.eval_fraction > 0:
            examples, eval_examples = split_by_prompt(examples, cfg.eval_fraction, cfg.seed)
        lengths = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                       use_chat_template=cfg.use_chat_template)
        self.train_split = Split(tokenize(examples, self.tokenizer, report=report, **lengths))
        check_lengths(examples, self.tokenizer, report, **lengths)  # refuses limits that leave nothing to train
        self.eval_split = Split(tokenize(eval_examples, self.tokenizer, **lengths)) if eval_examples else None
        if not self.train_split.examples:
            raise ValueError(f"{cfg.data}: no usable example left after tokenization (see data_report.json)")
        if self.eval_split is not None and not self.eval_split.examples:  # said now, not at the first evaluation
            raise ValueError(f"{cfg.eval_data or 'eval_fraction'}: no usable held-out example left after tokenization"
                             " (max_length / max_prompt_length cut them all)")
        auto = [name for name in ("desirable_weight", "undesirable_weight") if getattr(cfg, name) == "auto"]
        cfg.desirable_weight, cfg.undesirable_weight = complete_weights(  # paper eq. 8 on the examples kept
            cfg.desirable_weight, cfg.undesirable_weight, report.n_desirable, report.n_undesirable)
        if self.accelerator.is_main_process:
            report.save(run.path / "data_report.json")
            cfg.save(run.path / "config.yaml")
            self.tokenizer.save_pretrained(run.path)
        for warning in report.warnings:
            if not (len(auto) == 2 and warning.startswith("Labels are imbalanced")):  # already balanced: nothing to do
                self.accelerator.print(f"data warning: {warning}")

        # model: 4-bit base + LoRA; the same object is the reference with its adapters off
        run.status("running", phase="loading model")
        self.model = add_lora(load_base(cfg.model, load_in_4bit=cfg.load_in_4bit, precision=self.precision,
                                        revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                        attn_implementation=cfg.attn_implementation, fsdp=cfg.fsdp), cfg)
        output_head(self.model)  # a head that is not a (scaled / capped) linear layer is refused here, not trained wrong
        # humanline: a frozen "reference" adapter that follows the trained one (training/humanline.py)
        self.humanline = Humanline(cfg, self.model, self.accelerator) if cfg.humanline else None
        self.pad_id = self.tokenizer.pad_token_id

        # the plan: every optimizer step's micro-batches, fixed before the first step
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.batches_per_epoch = len(self.epoch_plan(self.train_split, 0))
        self.steps = plan_steps(lambda e: self.epoch_plan(self.train_split, e), self.batches_per_epoch, cfg)
        n_epochs = self.steps[-1][-1][0] + 1  # the epoch of the last micro-batch
        self.train_split.kl_partners = [self.pairing(self.train_split, e) for e in range(n_epochs)]
        if self.eval_split:
            self.eval_split.kl_partners = [self.pairing(self.eval_split, 0)]
            self.eval_batches = self.eval_plan()
        # padded, packed or shared rows: decided once (probing the unsharded model), for training and reference
        self.layout = decide_layout(self.model, cfg, self.train_split.examples, self.train_split.kl_partners)
        self.accelerator.print(f"rows: {self.layout.why}")
        run.status("running", phase="loading model", layout=self.layout.to_dict())
        self.fingerprint = model_fingerprint(self.model, cfg.revision)  # names the cached reference log-probs

        # every forward goes through one module: DDP must see the one that produces the graded log-probs, and
        # FSDP gathers the embeddings and the head (the root's weights) only inside the root's forward
        self.policy = PolicyLogps(self.model)
        self.parallel = parallel(cfg, self.accelerator)
        self.parallel.shard(self.policy, self.model, self.precision)  # before the optimizer: it holds the shards
        # optimizer and schedule over the LoRA weights only
        self.optimizer = make_optimizer(self.model, cfg)
        warmup = int(cfg.warmup_ratio * len(self.steps))
        schedule = "constant_with_warmup" if cfg.lr_scheduler_type == "constant" and warmup else cfg.lr_scheduler_type
        self.scheduler = get_scheduler(schedule, self.optimizer, num_warmup_steps=warmup,
                                       num_training_steps=len(self.steps))
        self.policy, self.optimizer = self.parallel.prepare(self.policy, self.optimizer)

    @property
    def precision(self) -> str:
        return {"bf16": "bf16", "fp16": "fp16"}.get(self.accelerator.mixed_precision, "no")

    def epoch_plan(self, split: Split, epoch: int) -> list[list[int]]:
        """This process's micro-batches of `epoch`: a pure function of (seed, epoch), so resume needs no state."""
        ex = split.examples
        batches = epoch_batches([len(e.prompt_ids) + len(e.completion_ids) for e in ex], [e.label for e in ex],
                                self.config.batch_size, seed=self.config.seed, epoch=epoch,
                                group_by_length=self.config.group_by_length)
        per_process = len(batches) // self.accelerator.num_processes
        if per_process == 0:
            raise ValueError(f"{len(ex)} examples cannot make one batch on each of "
                             f"{self.accelerator.num_processes} processes")
        return batches[self.accelerator.process_index :: self.accelerator.num_processes][:per_process]

    def eval_plan(self) -> list[list[int] | None]:
        """This process's evaluation micro-batches: every held-out example exactly once over all processes (batch j
        on process j % world). A process with one batch fewer gets None for the last round, where it runs a
        stand-in that counts nothing: every process makes the same forwards and reductions (each is a
        collective under FSDP), however few the held-out examples."""
        ex, world, rank = self.eval_split.examples, self.accelerator.num_processes, self.accelerator.process_index
        batches = epoch_batches([len(e.prompt_ids) + len(e.completion_ids) for e in ex], [e.label for e in ex],
                                self.config.batch_size, seed=self.config.seed, epoch=0,
                                group_by_length=self.config.group_by_length)
        mine = batches[rank::world]
        return mine + [None] * (math.ceil(len(batches) / world) - len(mine))

    def pairing(self, split: Split, epoch: int) -> list[int]:
        """Each example's KL partner: another example with a completion of similar length (a derangement,
        new every epoch unless kl_pairing is "fixed")."""
        return kl_partners(len(split.examples), seed=self.config.seed,
                           epoch=epoch if self.config.kl_pairing == "per_epoch" else 0,
                           lengths=[len(e.completion_ids) for e in split.examples])

    def compute_reference_columns(self, split: Split) -> None:
        """log pi_ref of every example and of every epoch's KL rows, no grad, cached on disk: one pass each, or,
        with shared prompts, one pass over each prompt followed by its completion and all its KL completions."""
        ex, cfg = split.examples, self.config
        kw = dict(pad_token_id=self.pad_id, batch_size=cfg.batch_size * REFERENCE_BATCH_MULTIPLIER,
                  cache_dir=default_cache_dir(), fingerprint=self.fingerprint, score=self.score,
                  show_progress=self.show_progress, world=self.world, rank=self.rank, packed=self.layout.packed,
                  split=self.parallel.split_reference)
        pairings = []  # the distinct pairings (kl_pairing: fixed -- one for every epoch)
        for p in split.kl_partners if cfg.loss_type == "kto" else []:  # apo_zero_unpaired has no z0, no KL rows
            pairings += [] if p in pairings else [p]
        kl_completions = [[ex[p[i]].completion_ids[: cfg.max_length - len(e.prompt_ids)] for i, e in enumerate(ex)]
                          for p in pairings]
        with self.accelerator.autocast():
            if self.layout.shared_reference and pairings:
                columns = cached_reference_logps(
                    self.model, [(e.prompt_ids, [e.completion_ids, *(kl[i] for kl in kl_completions)])
                                 for i, e in enumerate(ex)], desc="reference log-probs (examples and KL rows)",
                    shared=True, **kw)  # (N, 1 + distinct pairings)
            else:
                prompts = [e.prompt_ids for e in ex]
                passes = [("reference log-probs", [e.completion_ids for e in ex]),
                          *((f"reference KL log-probs, epoch {k + 1}", kl) for k, kl in enumerate(kl_completions))]
                columns = torch.stack([cached_reference_logps(self.model, list(zip(prompts, completions)), desc=desc, **kw)
                                       for desc, completions in passes], dim=1)  # (N, 1 + distinct pairings)
        split.reference_logps = columns[:, 0].contiguous()
        split.reference_kl_logps = [columns[:, 1 + pairings.index(p)].contiguous() for p in split.kl_partners
                                    ] if pairings else []

    def micro_batch(self, split: Split, epoch: int, indices: list[int]) -> MicroBatch:
        ex, device, cfg = split.examples, self.accelerator.device, self.config
        prompts, completions = [ex[i].prompt_ids for i in indices], [ex[i].completion_ids for i in indices]
        kl_completions = [ex[split.kl_partners[epoch][i]].completion_ids for i in indices] if cfg.loss_type == "kto" else None
        if self.layout.shared_training:  # one row per prompt: [prompt | completion | KL completion]
            rows, kl_rows = collate_shared(prompts, [completions, kl_completions], cfg.max_length), None
        else:
            rows = collate(prompts, completions, self.pad_id, packed=self.layout.packed)
            kl_rows = collate(prompts, kl_completions, self.pad_id, cfg.max_length,
                              packed=self.layout.packed).to(device) if kl_completions else None
        column = split.reference_logps
        return MicroBatch(
            rows=rows.to(device), kl_rows=kl_rows,
            labels=torch.tensor([ex[i].label for i in indices], dtype=torch.bool, device=device),
            reference_logps=column[indices].to(device) if column is not None else None,
            reference_kl_logps=(split.reference_kl_logps[epoch][indices].to(device)
                                if split.reference_kl_logps else None),
            shared=self.layout.shared_training)

    # ------------------------------------------------------------------ the pieces of a step
    def reference_logps(self, mb: MicroBatch, kl: bool = False) -> torch.Tensor:
        """(B,) log pi_ref of the examples (kl: of the KL rows): the precomputed column, or the same model with
        its adapters off, no grad (kept in `mb`: on shared rows one pass gives both)."""
        cached = mb.reference_kl_logps if kl else mb.reference_logps
        if cached is not None:
            return cached
        with self.accelerator.autocast(), reference_mode(self.model):
            if mb.shared:
                logps = self.score(mb.rows)  # (2B,): the examples, then their KL rows
                mb.reference_logps, mb.reference_kl_logps = logps[: len(mb)], logps[len(mb) :]
                return mb.reference_kl_logps if kl else mb.reference_logps
            logps = self.score(mb.kl_rows if kl else mb.rows)
        if kl:
            mb.reference_kl_logps = logps
        else:
            mb.reference_logps = logps
        return logps

    def score(self, rows: Rows) -> torch.Tensor:
        """(n_sequences,) log-probs for the passes without grad (fsdp.py: which module runs them)."""
        return self.parallel.score(self.policy, self.model, rows)

    def policy_logps(self, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B,) log pi(y|x) with grad; on shared-prompt rows also the KL rows' (B,), from the same forward, detached.
        Under the autocast of every other pass (accelerate's DDP wrapper adds it; FSDP's module has no wrapper)."""
        with self.accelerator.autocast():
            logps = self.policy(mb.rows)
        return (logps[: len(mb)], logps[len(mb) :].detach()) if mb.shared else (logps, None)

    def kl_logps(self, mb: MicroBatch, policy_kl_logps: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B,) log pi and (B,) log pi_ref of the KL rows, and (B,) which rows kept a completion token (they only
        feed the detached z0). The policy's come from a no-grad pass here, unless the policy forward gave them."""
        if policy_kl_logps is None:
            with self.accelerator.autocast(), no_grad_policy(self.model):
                policy_kl_logps = self.score(mb.kl_rows)
        return policy_kl_logps, self.reference_logps(mb, kl=True), (mb.kl_completion_lengths() > 0) & mb.counted

    def z0(self, micro_batches: list[MicroBatch], policy_kl_logps: list | None = None) -> torch.Tensor:
        """z0 (eq. 7, loss.z0_estimate) over these micro-batches and over all processes, detached.
        apo_zero_unpaired has no reference point: 0."""
        if self.config.loss_type != "kto":
            return torch.zeros((), device=self.accelerator.device)
        policy_kl_logps = policy_kl_logps or [None] * len(micro_batches)
        policy, reference, keep = (torch.cat(parts) for parts in zip(
            *(self.kl_logps(mb, kl) for mb, kl in zip(micro_batches, policy_kl_logps))))
        # every process uses the same z0 (docs/design.md): the sums and counts are added over all of them
        reduce = partial(self.accelerator.reduce, reduction="sum") if self.world > 1 else None
        return z0_estimate(policy, reference, keep=keep, reduce=reduce)

    @property
    def loss_settings(self) -> dict:
        cfg = self.config
        return dict(beta=cfg.beta, desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight,
                    loss_type=cfg.loss_type)

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, micro_batches: list[MicroBatch], meter: Meter) -> bool:
        """Policy log-probs -> z0 -> kto_loss -> backward for each micro-batch; then clip and step.

        Returns False when the step was skipped because the loss or the gradients were not finite.
        """
        cfg, n_examples = self.config, sum(len(mb) for mb in micro_batches)
        step_z0 = self.z0(micro_batches) if cfg.kl_over_step else None  # one z0 for the whole step
        finite = True
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with nullcontext() if last else self.accelerator.no_sync(self.policy):  # sync grads once per step
                if self.humanline is not None:  # clamped per-token log-ratios against the synced reference
                    out, policy_logps = self.humanline.loss(self, mb)
                else:
                    policy_logps, policy_kl_logps = self.policy_logps(mb)  # (B,) log pi(y|x), with grad
                    reference_logps = self.reference_logps(mb)  # (B,) cached, or adapters off
                    z0 = step_z0 if step_z0 is not None else self.z0([mb], [policy_kl_logps])  # () detached, all processes
                    out = kto_loss(policy_logps, reference_logps, mb.labels, z0=z0, **self.loss_settings)
                self.accelerator.backward(out.loss * len(mb) / n_examples)  # the step's mean over examples
            finite &= bool(torch.isfinite(out.loss))
            meter.add(out, policy_logps.detach(), mb.labels, mb.rows.tokens(len(mb)))
        grad_norm = self.accelerator.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], cfg.max_grad_norm or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a norm over the shards of all processes
            grad_norm = grad_norm.full_tensor()
        finite &= bool(torch.isfinite(grad_norm))
        if finite or self.accelerator.scaler is not None:
            self.optimizer.step()  # with fp16 the loss scaler skips an overflowing step itself and lowers its scale
        stepped = finite and not getattr(self.optimizer, "step_was_skipped", False)
        if stepped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        meter.step(float(grad_norm), skipped=not stepped)
        return stepped

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The training metrics on the held-out split (eval mode: no dropout), keys prefixed eval_."""
        meter = Meter()
        self.policy.eval()
        for indices in self.eval_batches:
            mb = self.micro_batch(self.eval_split, 0, indices or [0])  # None: a stand-in (eval_plan)
            mb.counted = indices is not None
            policy_logps, policy_kl_logps = self.policy_logps(mb)
            out = kto_loss(policy_logps, self.reference_logps(mb), mb.labels,
                           z0=self.z0([mb], [policy_kl_logps]), **self.loss_settings)
            if mb.counted:
                meter.add(out, policy_logps, mb.labels, mb.rows.tokens(len(mb)))
        self.policy.train()
        return {f"eval_{k}": v for k, v in meter.result(self.accelerator).items()}

    # ------------------------------------------------------------------ the loop
    def fit(self, resume_from: Path | None) -> dict:
        cfg, run, started = self.config, self.run, time.perf_counter()
        # all reference passes before the first step (and before a checkpoint's weights are loaded)
        if cfg.precompute_reference and self.humanline is None:  # humanline's reference moves: per step
            run.status("running", phase="reference log-probs")
            self.compute_reference_columns(self.train_split)
            if self.eval_split is not None:
                self.compute_reference_columns(self.eval_split)
        reference_seconds = time.perf_counter() - started
        start = 0
        if resume_from is not None:
            start = load_checkpoint(resume_from, self.model, self.optimizer, self.scheduler, self.accelerator, cfg,
                                    self.parallel.load_training_state)
            run.truncate_metrics(after_step=start)
            self.accelerator.print(f"resuming from {resume_from} at step {start}")
        total = len(self.steps)
        if self.judged is not None:  # step 0: the starting point's judged success, before the first step
            self.judged.begin(start, self.model, self.tokenizer, self.save_checkpoint)
        if self.humanline is not None:  # the reference starts as the policy (a resumed run's too)
            self.humanline.begin(start)
        run.status("running", phase="training", step=start, total_steps=total)
        self.policy.train()
        bar = tqdm(total=total, initial=start, desc="KTO", disable=not self.show_progress, dynamic_ncols=True)
        meter, skipped_in_a_row, tokens = Meter(), 0, 0
        limit = MAX_SKIPPED_STEPS_FP16 if self.accelerator.scaler is not None else MAX_SKIPPED_STEPS
        for step in range(start + 1, total + 1):
            micro_batches = [self.micro_batch(self.train_split, epoch, indices) for epoch, indices in self.steps[step - 1]]
            stepped = self.train_step(micro_batches, meter)
            if self.humanline is not None:
                self.humanline.step_done(step)  # every humanline_sync_steps: reference <- policy
            skipped_in_a_row = 0 if stepped else skipped_in_a_row + 1
            if not stepped:
                self.accelerator.print(f"warning: step {step} skipped: the loss or the gradients were not finite")
            if skipped_in_a_row >= limit:
                raise FloatingPointError(NONFINITE_ADVICE.format(n=skipped_in_a_row))
            if step == total:  # the run's weights are safe before its last evaluation (or judge) can fail
                self.save_checkpoint(total)
            stop_now = self._stop_requested()
            evaluate = self.eval_split is not None and (step % cfg.eval_steps == 0 or step == total)
            judge_now = self.judged is not None and self.judged.due(step, total)
            if step % cfg.logging_steps == 0 or step == total or evaluate or judge_now or stop_now:
                line = {"step": step, "epoch": round(self.epochs_done(step), 4), **meter.result(self.accelerator),
                        "learning_rate": self.scheduler.get_last_lr()[0], "peak_memory_mb": round(peak_memory_mb(), 1)}
                tokens += line.pop("tokens")
                if evaluate:
                    line.update(self.evaluate())
                if judge_now:
                    line.update(self.judged.evaluate(step, self.model, self.tokenizer))
                run.log(line)
                self.accelerator.log(line, step=step)  # trackers (report_to); no-op without
                run.status("running", phase="training", step=step, total_steps=total)
                bar.set_postfix(loss=f"{line['loss']:.4f}", margin=f"{line.get('rewards/margins', 0):.3f}")
                meter = Meter()
            bar.update(1)
            keep = judge_now and self.judged.keep_checkpoint(step, total)  # keep_best's new best, early stop's last
            if step < total and (stop_now or keep or (cfg.save_steps and step % cfg.save_steps == 0)):
                self.save_checkpoint(step)
            if stop_now or (judge_now and self.judged.stop_early):  # early_stopping_patience: finished early
                bar.close()
                return self.finish("stopped" if stop_now else "finished", step, started, reference_seconds, tokens)
        bar.close()
        if start == total:  # resumed after the last step: the checkpoint it resumed from is the run's last
            self.save_checkpoint(total)
        return self.finish("finished", total, started, reference_seconds, tokens)

    def epochs_done(self, step: int) -> float:
        micro = sum(len(s) for s in self.steps[:step])
        return micro / self.batches_per_epoch

    def _stop_requested(self) -> bool:
        if self.world == 1:
            return self.stop_requested
        flag = torch.tensor(float(self.stop_requested), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "max"))

    # ------------------------------------------------------------------ save
    def save_checkpoint(self, step: int) -> None:
        self.accelerator.wait_for_everyone()
        whole = self.parallel.gathered_training_state(self.model, self.optimizer)  # every process takes part
        self.run.save_checkpoint(step, self.model, self.optimizer, self.scheduler, self.accelerator, self.config,
                                 whole=whole)

    def finish(self, state: str, step: int, started: float, reference_seconds: float, tokens: int) -> dict:
        self.accelerator.wait_for_everyone()
        adapter = self.parallel.gathered_adapter(self.model)  # every process takes part
        self.run.save_adapter(self.model, adapter)  # each file whole, adapter_config.json last
        seconds = time.perf_counter() - started
        timing = {"reference_seconds": round(reference_seconds, 3),
                  "train_seconds": round(seconds - reference_seconds, 3), "tokens": tokens,
                  "shared_prompts": {"reference": self.layout.shared_reference, "training": self.layout.shared_training},
                  **self.parallel.timing()}
        message = "" if state == "finished" else f"stopped at step {step}; resume with --resume_from_checkpoint true"
        judged = self.judged.finish() if self.judged is not None else {}  # keep_best: the best checkpoint's adapter
        self.run.status(state, phase=state, step=step, message=message, timing=timing, **judged)
        return {"state": state, "step": step, "total_steps": len(self.steps), "seconds": seconds, **judged}


# ====================================================================== the entry point
def train(config: TrainConfig, *, show_progress: bool = True) -> Path:
    """Run a whole training as `config` says; returns output_dir. Raises on failure, after writing status."""
    config = config.resolved()
    _check_tracker_installed(config.report_to)
    if config.push_to_hub:
        check_hub_access(config.push_to_hub)  # no token: say so now, not after hours of training
    precision = choose_precision(config.mixed_precision)
    check_precision(config.model, precision, revision=config.revision, trust_remote_code=config.trust_remote_code)
    accelerator = Accelerator(  # cpu=True lets `torchrun` on a CPU-only machine use gloo
        mixed_precision=precision, cpu=not torch.cuda.is_available(),
        log_with=None if config.report_to == "none" else config.report_to, project_dir=config.output_dir)
    check_launch(config, accelerator, precision)
    resume_from = _prepare_output_dir(config, accelerator)
    run = RunDir(config.output_dir, main=accelerator.is_main_process)
    recipe = Recipe(config, accelerator, run, show_progress)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _catch_stop_signals(recipe)
        run.status("running", phase="loading tokenizer and data", step=0)
        recipe.setup()
        if config.report_to != "none":
            accelerator.init_trackers("kto_lite", config=_tracker_config(recipe.config))
        result = recipe.fit(resume_from)
    except torch.cuda.OutOfMemoryError as e:
        run.status("failed", message=OOM_ADVICE)
        raise RuntimeError(OOM_ADVICE) from e
    except BaseException as e:
        run.status("failed", message=f"{type(e).__name__}: {e}")
        raise
    finally:
        if config.report_to != "none":
            accelerator.end_training()
        for sig, handler in previous.items():
            if handler is not None:
                _set_signal(sig, handler)
    out = Path(config.output_dir)
    if accelerator.is_main_process:
        write_model_card(out, config.push_to_hub)  # README.md: how it was trained, how to load it
        if config.push_to_hub and result["state"] == "finished":
            result["url"] = push_run(out, config.push_to_hub, private=config.hub_private)
        if show_progress:
            print(summary(out, result))
    return out


def _prepare_output_dir(config: TrainConfig, accelerator: Accelerator) -> Path | None:
    """The main process alone decides what to do with output_dir; the others get its answer (or error)."""
    answer: list = [None, None]
    if accelerator.is_main_process:
        try:
            answer[0] = prepare_output_dir(config)
        except ConfigError as e:
            answer[1] = str(e)
    if accelerator.num_processes > 1:
        answer = broadcast_object_list(answer)
    if answer[1] is not None:
        raise ConfigError(answer[1])
    return answer[0]


def _catch_stop_signals(recipe: Recipe) -> None:
    """SIGINT/SIGTERM ask for a graceful stop (checkpoint + adapter saved); a second SIGINT aborts."""

    def handle(signum, frame):
        if recipe.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        recipe.stop_requested = True
        print("\nstop requested: finishing this step, then saving a checkpoint and the adapter", flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        _set_signal(sig, handle)


def _set_signal(sig, handler) -> None:
    try:
        signal.signal(sig, handler)
    except ValueError:  # not the main thread (e.g. called from a UI worker): no signal handling
        pass


def _check_tracker_installed(report_to: str) -> None:
    import importlib.util

    if report_to != "none" and importlib.util.find_spec(report_to) is None:
        raise ConfigError(f"report_to: {report_to} is not installed; `pip install {report_to}`, or report_to: none")


def _tracker_config(config: TrainConfig) -> dict:
    """Trackers take flat scalars: lists and mappings become text."""
    return {k: (", ".join(v) if isinstance(v, list) else ", ".join(f"{a}={b}" for a, b in v.items())
                if isinstance(v, dict) else v) for k, v in config.to_dict().items()}


def summary(output_dir: Path, result: dict) -> str:
    """A few lines a user can act on: what happened, did it learn, where the adapter is, how to use it."""
    rows = read_metrics(output_dir)
    head, tail = rows[: max(1, len(rows) // 10)], rows[-max(1, len(rows) // 10) :]

    def mean(part, key):
        values = [r[key] for r in part if key in r]
        return sum(values) / len(values) if values else None

    minutes, seconds = divmod(int(result["seconds"]), 60)
    lines = [f"{result['state']}: {result['step']} of {result['total_steps']} steps in {minutes}m {seconds:02d}s"]
    for key, name in (("loss", "loss"), ("rewards/margins", "reward margin"), ("eval_rewards/margins", "eval margin")):
        first, last = mean(head, key), mean(tail, key)
        if first is not None and last is not None and rows:
            lines.append(f"  {name:<14} {first:.4f} -> {last:.4f}  (first -> last {len(tail)} logged steps)")
    lines += judged_summary_lines(rows, result)
    lines.append(f"  adapter        {output_dir}")
    lines.append(f"  chat with it   python -m kto_lite chat --adapter {output_dir}")
    if result.get("url"):
        lines.append(f"  on the Hub     {result['url']}")
    if result["state"] == "stopped":
        lines.append(f"  resume         python -m kto_lite train {output_dir / 'config.yaml'} "
                     f"--resume_from_checkpoint true")
    return "\n".join(lines)


def make_optimizer(model, config: TrainConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    name = resolve_optimizer(config.optimizer, fsdp=config.fsdp)
    kw = dict(lr=config.learning_rate, weight_decay=config.weight_decay)
    if name == "adamw_torch":
        return torch.optim.AdamW(params, **kw)
    import bitsandbytes as bnb

    cls = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "adamw_8bit": bnb.optim.AdamW8bit}[name]
    return cls(params, **kw)
