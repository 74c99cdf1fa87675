"""KTO training, top to bottom: data -> model -> reference log-probs -> loop -> adapter.

One optimizer step (`train_step`): for each micro-batch, policy log-probs of the examples (with
grad), policy log-probs of the KL rows (no grad: z0 is detached), reference log-probs of both
(cached, or adapters off), `kto_loss`, backward; then clip, optimizer step, log.

accelerate provides devices, DDP (`accelerate launch` / `torchrun`), mixed precision and
no-sync accumulation; transformers provides the LR schedules. Checkpoints are ours because they
hold only the adapter and optimizer state (accelerate's save_state would copy the 4-bit base).
"""

from __future__ import annotations

import math
import random
import resource
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from .batching import collate, epoch_batches, kl_partners
from .config import TrainConfig
from .data import load_data, tokenize
from .logps import PolicyLogps, completion_logps
from .loss import kto_loss, z0_estimate
from .model import (
    add_lora,
    compute_dtype,
    load_base,
    load_tokenizer,
    no_grad_policy,
    reference_mode,
)
from .reference import (
    REFERENCE_BATCH_MULTIPLIER,
    cached_reference_logps,
    default_cache_dir,
    model_fingerprint,
)
from .run_dir import RunDir, load_checkpoint, prepare_output_dir

OOM_ADVICE = ("out of GPU memory. Lower batch_size (and raise gradient_accumulation_steps to keep the "
              "effective batch), lower max_length / max_prompt_length, keep gradient_checkpointing and "
              "load_in_4bit on, or lower lora_r. `python -m kto_lite estimate` predicts what fits.")


def train(config: TrainConfig, *, show_progress: bool = True) -> Path:
    """Run a whole training as `config` says; returns output_dir. Raises on failure, after writing status."""
    config = config.resolved()
    resume_from = prepare_output_dir(config)
    accelerator = Accelerator(  # cpu=True lets `torchrun` on a CPU-only machine use gloo
        mixed_precision={torch.bfloat16: "bf16", torch.float16: "fp16"}.get(compute_dtype(), "no"),
        cpu=not torch.cuda.is_available())
    run = RunDir(config.output_dir, main=accelerator.is_main_process)
    stop = _StopFlag()
    try:
        run.status("running", phase="loading data", step=0)
        trainer = Trainer(config, accelerator, run, stop, show_progress)
        trainer.fit(resume_from)
    except torch.cuda.OutOfMemoryError as e:
        run.status("failed", message=OOM_ADVICE)
        raise RuntimeError(OOM_ADVICE) from e
    except BaseException as e:
        run.status("failed", message=f"{type(e).__name__}: {e}")
        raise
    finally:
        stop.restore()
    return Path(config.output_dir)


class _StopFlag:
    """SIGINT/SIGTERM ask for a graceful stop (checkpoint + adapter saved); a second SIGINT aborts."""

    def __init__(self):
        self.requested = False
        self._old = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. called from a UI worker): no signal handling
            self._old = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstop requested: finishing this step, then saving a checkpoint and the adapter", flush=True)

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


@dataclass
class Split:
    """Tokenized examples plus their cached reference log-probs."""

    examples: list
    reference: torch.Tensor | None = None  # (N,)
    reference_kl: dict[int, torch.Tensor] = field(default_factory=dict)  # epoch -> (N,)
    plans: dict[int, list[list[int]]] = field(default_factory=dict)  # epoch -> this process's batches
    partners: dict[int, list[int]] = field(default_factory=dict)  # epoch -> KL partner of each example


class Trainer:
    def __init__(self, config: TrainConfig, accelerator: Accelerator, run: RunDir, stop: _StopFlag, show_progress):
        self.config, self.accelerator, self.run, self.stop = config, accelerator, run, stop
        self.show_progress = show_progress and accelerator.is_local_main_process
        set_seed(config.seed)

        # ---- data: read, report, tokenize (every process does the same, deterministically)
        self.tokenizer = load_tokenizer(config.model)
        examples, report = load_data(config.data)
        eval_examples = None
        if config.eval_data:
            eval_examples, _ = load_data(config.eval_data)
        elif config.eval_fraction > 0:
            shuffled = random.Random(config.seed).sample(examples, len(examples))
            n_eval = max(1, int(len(examples) * config.eval_fraction))
            eval_examples, examples = shuffled[:n_eval], shuffled[n_eval:]
        tok = dict(max_length=config.max_length, max_prompt_length=config.max_prompt_length,
                   use_chat_template=config.use_chat_template)
        self.train_split = Split(tokenize(examples, self.tokenizer, report=report, **tok))
        self.eval_split = Split(tokenize(eval_examples, self.tokenizer, **tok)) if eval_examples else None
        if not self.train_split.examples:
            raise ValueError(f"{config.data}: no usable example left after tokenization (see data_report.json)")
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(config, name) == "auto":  # the report's suggestion for the examples kept (paper eq. 8)
                setattr(config, name, float(getattr(report, name)))
        if accelerator.is_main_process:
            report.save(run.path / "data_report.json")
            config.save(run.path / "config.yaml")
            self.tokenizer.save_pretrained(run.path)
        for warning in getattr(report, "warnings", []):
            accelerator.print(f"data warning: {warning}")

        # ---- model: 4-bit base + LoRA; the same object is the reference with adapters off
        run.status("running", phase="loading model")
        self.model = add_lora(load_base(config.model, load_in_4bit=config.load_in_4bit), config)
        self.optimizer = make_optimizer(self.model, config)
        self.world = accelerator.num_processes
        self.batches_per_epoch = len(self._epoch_plan(0))
        self.total_steps = config.max_steps or math.ceil(
            config.num_epochs * self.batches_per_epoch / config.gradient_accumulation_steps)
        self.scheduler = get_scheduler(config.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=int(config.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)
        # DDP must see the forward that produces the graded log-probs: wrap it as a module
        self.policy, self.optimizer = accelerator.prepare(PolicyLogps(self.model), self.optimizer)
        self.pad_id = self.tokenizer.pad_token_id
        self.cache_dir = default_cache_dir() if config.precompute_reference else None
        self._fingerprint = None

    # ------------------------------------------------------------------ data plan
    def _epoch_plan(self, epoch: int, split: Split | None = None) -> list[list[int]]:
        """This process's micro-batches of `epoch`: a pure function of (seed, epoch), so resume needs no state."""
        split = split or self.train_split
        if epoch not in split.plans:
            ex = split.examples
            batches = epoch_batches([len(e.prompt_ids) + len(e.completion_ids) for e in ex], [e.label for e in ex],
                                    self.config.batch_size, seed=self.config.seed, epoch=epoch,
                                    group_by_length=self.config.group_by_length)
            per_process = len(batches) // self.world
            if per_process == 0:
                raise ValueError(f"{len(ex)} examples cannot make one batch on each of {self.world} processes")
            rank = self.accelerator.process_index
            split.plans = {epoch: batches[rank :: self.world][:per_process]}  # keep one epoch
        return split.plans[epoch]

    def _partners(self, split: Split, epoch: int) -> list[int]:
        if epoch not in split.partners:
            split.partners = {epoch: kl_partners(len(split.examples), seed=self.config.seed, epoch=epoch)}
        return split.partners[epoch]

    # ------------------------------------------------------------------ reference log-probs
    def _reference(self, split: Split, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached reference log-probs of the examples and of this epoch's KL rows, (N,) each."""
        if split.reference is None or epoch not in split.reference_kl:
            if self._fingerprint is None:
                self._fingerprint = model_fingerprint(self.model)  # config incl. quantization + weight files
            ex, partners = split.examples, self._partners(split, epoch)
            kw = dict(pad_token_id=self.pad_id, batch_size=self.config.batch_size * REFERENCE_BATCH_MULTIPLIER,
                      cache_dir=self.cache_dir, fingerprint=self._fingerprint, show_progress=self.show_progress)
            self.run.status("running", phase=f"reference log-probs (epoch {epoch + 1})")
            with self.accelerator.autocast():
                if split.reference is None:
                    split.reference = cached_reference_logps(
                        self.model, [(e.prompt_ids, e.completion_ids) for e in ex], desc="reference log-probs", **kw)
                kl_rows = [(e.prompt_ids, ex[partners[i]].completion_ids[: self.config.max_length - len(e.prompt_ids)])
                           for i, e in enumerate(ex)]
                split.reference_kl[epoch] = cached_reference_logps(self.model, kl_rows, desc="reference KL log-probs", **kw)
            split.reference_kl = {epoch: split.reference_kl[epoch]}  # keep one epoch in memory
        return split.reference, split.reference_kl[epoch]

    # ------------------------------------------------------------------ one micro-batch
    def _batch(self, split: Split, epoch: int, indices: list[int]) -> dict:
        ex, partners, device = split.examples, self._partners(split, epoch), self.accelerator.device
        prompts = [ex[i].prompt_ids for i in indices]
        return {"rows": collate(prompts, [ex[i].completion_ids for i in indices], self.pad_id).to(device),
                "kl_rows": collate(prompts, [ex[partners[i]].completion_ids for i in indices], self.pad_id,
                                   self.config.max_length).to(device),
                "labels": torch.tensor([ex[i].label for i in indices], dtype=torch.bool, device=device),
                "index": torch.tensor(list(indices), dtype=torch.long)}

    def _reference_logps(self, split: Split, epoch: int, batch: dict, prefix: str = "") -> torch.Tensor:
        """Reference log-probs of the batch's rows (prefix "") or KL rows ("kl_"): cached, or adapters off."""
        if self.config.precompute_reference:
            reference, reference_kl = self._reference(split, epoch)
            return (reference_kl if prefix else reference)[batch["index"].cpu()].to(self.accelerator.device)
        with self.accelerator.autocast(), reference_mode(self.model):
            return completion_logps(self.model, batch[prefix + "rows"])

    def _kl_logps(self, split: Split, epoch: int, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy and reference log-probs of the KL rows, (B,) each: they only feed the detached z0."""
        with self.accelerator.autocast(), no_grad_policy(self.model):
            policy_kl_logps = completion_logps(self.model, batch["kl_rows"])
        return policy_kl_logps, self._reference_logps(split, epoch, batch, "kl_")

    def _forward(self, split: Split, epoch: int, indices: list[int], *, grad: bool, z0: torch.Tensor | None = None):
        """kto_loss on one micro-batch (z0 from its own KL rows unless given). Returns the loss output,
        policy log-probs, labels and token count."""
        cfg, batch = self.config, self._batch(split, epoch, indices)
        with nullcontext() if grad else torch.no_grad():
            policy_logps = self.policy(batch["rows"])  # (B,), with grad during training
        reference_logps = self._reference_logps(split, epoch, batch)
        if z0 is None and cfg.loss_type == "kto":
            z0 = z0_estimate(*self._kl_logps(split, epoch, batch))
        out = kto_loss(policy_logps, reference_logps, batch["labels"], z0=z0, beta=cfg.beta,
                       desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight,
                       loss_type=cfg.loss_type)
        return out, policy_logps.detach(), batch["labels"], batch["rows"].tokens()

    def _step_z0(self, step: int) -> torch.Tensor:
        """z0 over all micro-batches of one optimizer step (kl_over_step): a steadier estimate at batch size 1."""
        gas, pairs = self.config.gradient_accumulation_steps, []
        for micro in range(gas):
            epoch, position = divmod(step * gas + micro, self.batches_per_epoch)
            pairs.append(self._kl_logps(self.train_split, epoch,
                                        self._batch(self.train_split, epoch, self._epoch_plan(epoch)[position])))
        return z0_estimate(torch.cat([p for p, _ in pairs]), torch.cat([r for _, r in pairs]))

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, step: int, meter: Meter) -> float:
        """gradient_accumulation_steps micro-batches, then one optimizer step. Returns the grad norm."""
        gas = self.config.gradient_accumulation_steps
        if self.config.precompute_reference:  # a new epoch's KL pairing: its reference pass before any activation
            for micro in range(gas):
                self._reference(self.train_split, (step * gas + micro) // self.batches_per_epoch)
        z0 = self._step_z0(step) if self.config.kl_over_step and self.config.loss_type == "kto" else None
        for micro in range(gas):
            epoch, position = divmod(step * gas + micro, self.batches_per_epoch)
            indices = self._epoch_plan(epoch)[position]
            last = micro == gas - 1
            with nullcontext() if last else self.accelerator.no_sync(self.policy):  # sync grads once per step
                out, policy_logps, labels, tokens = self._forward(self.train_split, epoch, indices, grad=True, z0=z0)
                self.accelerator.backward(out.loss / gas)
            meter.add(out, policy_logps, labels, tokens)
        grad_norm = self.accelerator.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], self.config.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The training metrics on the held-out split (eval mode: no dropout), keys prefixed eval_."""
        meter = Meter(self.accelerator)
        self.policy.eval()
        for indices in self._epoch_plan(0, self.eval_split):
            out, policy_logps, labels, tokens = self._forward(self.eval_split, 0, indices, grad=False)
            meter.add(out, policy_logps, labels, tokens)
        self.policy.train()
        return {f"eval_{k}": v for k, v in meter.result().items()}

    # ------------------------------------------------------------------ the loop
    def fit(self, resume_from: Path | None) -> None:
        cfg, run = self.config, self.run
        start = 0
        if resume_from is not None:
            start = load_checkpoint(resume_from, self.model, self.optimizer, self.scheduler)
            run.truncate_metrics(after_step=start)
            self.accelerator.print(f"resuming from {resume_from} at step {start}")
        if cfg.precompute_reference:  # all reference passes before the first step, none during training
            self._reference(self.train_split, (start * cfg.gradient_accumulation_steps) // self.batches_per_epoch)
            if self.eval_split is not None:
                self._reference(self.eval_split, 0)
        run.status("running", phase="training", step=start, total_steps=self.total_steps)
        self.policy.train()
        bar = tqdm(total=self.total_steps, initial=start, desc="KTO", disable=not self.show_progress)
        meter, clock = Meter(self.accelerator), time.perf_counter()
        step = start
        while step < self.total_steps:
            grad_norm = self.train_step(step, meter)
            step += 1
            meter.grad_norms.append(grad_norm)
            stop_now = self._stop_requested()
            evaluate = self.eval_split is not None and (step % cfg.eval_steps == 0 or step == self.total_steps)
            if step % cfg.logging_steps == 0 or step == self.total_steps or evaluate or stop_now:
                line = self._log_line(step, meter, time.perf_counter() - clock)
                if evaluate:
                    line.update(self.evaluate())
                run.log(line)
                run.status("running", phase="training", step=step, total_steps=self.total_steps)
                bar.set_postfix(loss=f"{line['loss']:.4f}", kl=f"{line['kl']:.3f}")
                meter, clock = Meter(self.accelerator), time.perf_counter()
            bar.update(1)
            if stop_now or (cfg.save_steps and step % cfg.save_steps == 0 and step < self.total_steps):
                self._save_checkpoint(step)
            if stop_now:
                self._save_final()
                run.status("stopped", phase="stopped", step=step, message=f"stopped at step {step}; resume "
                           "with --resume_from_checkpoint true")
                bar.close()
                return
        bar.close()
        self._save_checkpoint(step)
        self._save_final()
        run.status("finished", phase="finished", step=step, message="")

    def _stop_requested(self) -> bool:
        flag = torch.tensor(float(self.stop.requested), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "max")) if self.world > 1 else self.stop.requested

    def _log_line(self, step: int, meter: Meter, seconds: float) -> dict:
        line = {"step": step, "epoch": round(step * self.config.gradient_accumulation_steps / self.batches_per_epoch, 4)}
        line.update(meter.result())
        line["learning_rate"] = self.scheduler.get_last_lr()[0]
        line["grad_norm"] = sum(meter.grad_norms) / max(len(meter.grad_norms), 1)
        line["tokens_per_second"] = round(meter.tokens / max(seconds, 1e-9), 2)
        line["peak_memory_mb"] = round(peak_memory_mb(), 1)
        return line

    def _save_checkpoint(self, step: int) -> None:
        self.accelerator.wait_for_everyone()
        self.run.save_checkpoint(step, self.accelerator.unwrap_model(self.policy).model, self.optimizer,
                                 self.scheduler, keep=self.config.save_total_limit)

    def _save_final(self) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.accelerator.unwrap_model(self.policy).model.save_pretrained(self.run.path)


class Meter:
    """Sums over the micro-batches (and processes) of a logging window -> the logged averages."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.sums = torch.zeros(9, dtype=torch.float64)  # see `add` for the slots
        self.grad_norms: list[float] = []
        self.tokens = 0  # non-padding tokens of the examples (KL rows not counted)

    def add(self, out, policy_logps, labels, tokens: int) -> None:
        good, bad = labels.bool(), ~labels.bool()
        r, lp = out.rewards.double(), policy_logps.double()
        self.sums += torch.stack([
            out.losses.detach().double().sum().cpu(), torch.tensor(float(labels.numel())),  # loss, n
            out.kl.detach().double().cpu(), torch.tensor(1.0),  # kl, micro-batches
            r[good].sum().cpu(), lp[good].sum().cpu(), good.sum().double().cpu(),  # desirable side
            r[bad].sum().cpu(), lp[bad].sum().cpu(),  # undesirable side (count = n - n_good)
        ])
        self.tokens += tokens

    def result(self) -> dict:
        sums = self.sums
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums.to(self.accelerator.device), "sum").cpu()
        loss, n, kl, micro, r_good, lp_good, n_good, r_bad, lp_bad = sums.tolist()
        n_bad = n - n_good
        line = {"loss": loss / max(n, 1), "kl": kl / max(micro, 1)}
        if n_good:
            line.update({"rewards/chosen": r_good / n_good, "logps/chosen": lp_good / n_good})
        if n_bad:
            line.update({"rewards/rejected": r_bad / n_bad, "logps/rejected": lp_bad / n_bad})
        if n_good and n_bad:
            line["rewards/margins"] = line["rewards/chosen"] - line["rewards/rejected"]
        line["count/chosen"], line["count/rejected"] = int(n_good), int(n_bad)
        return line


def make_optimizer(model, config: TrainConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    name = config.optimizer
    if name == "auto":
        name = "paged_adamw_8bit" if torch.cuda.is_available() else "adamw_torch"
    kw = dict(lr=config.learning_rate, weight_decay=config.weight_decay)
    if name == "adamw_torch":
        return torch.optim.AdamW(params, **kw)
    import bitsandbytes as bnb

    cls = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "adamw_8bit": bnb.optim.AdamW8bit}[name]
    return cls(params, **kw)


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch; on CPU the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
