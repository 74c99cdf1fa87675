"""What a logged line of metrics.jsonl holds, summed over the micro-batches and processes of a window.

The names follow TRL's glossary (docs/design.md, "Logged metrics", defines each once). A side missing from a
window (no desirable example, say) leaves its keys out of the line, never NaN.
"""

from __future__ import annotations

import resource
import time

import torch


class Meter:
    """Named sums over one logging window; `result` reduces them over processes and averages."""

    SUMS = ("loss", "examples", "kl", "micro_batches", "rewards_chosen", "logps_chosen", "chosen",
            "rewards_rejected", "logps_rejected", "rejected", "tokens", "steps", "skipped", "grad_norm")

    def __init__(self):
        self.sums = dict.fromkeys(self.SUMS, 0.0)
        self.started = time.perf_counter()

    def add(self, out, policy_logps: torch.Tensor, labels: torch.Tensor, tokens: int) -> None:
        """One micro-batch: `out` is a KTOLossOutput; policy_logps and labels are (B,)."""
        good, bad = labels.bool(), ~labels.bool()
        rewards, logps = out.rewards.double().cpu(), policy_logps.double().cpu()
        good, bad = good.cpu(), bad.cpu()
        s = self.sums
        s["loss"] += float(out.losses.detach().double().sum())
        s["examples"] += labels.numel()
        s["kl"] += float(out.kl)
        s["micro_batches"] += 1
        s["rewards_chosen"] += float(rewards[good].sum())
        s["logps_chosen"] += float(logps[good].sum())
        s["chosen"] += int(good.sum())
        s["rewards_rejected"] += float(rewards[bad].sum())
        s["logps_rejected"] += float(logps[bad].sum())
        s["rejected"] += int(bad.sum())
        s["tokens"] += tokens  # non-padding tokens of the examples (KL rows not counted)

    def step(self, grad_norm: float, *, skipped: bool) -> None:
        self.sums["steps"] += 1
        self.sums["skipped"] += skipped
        if not skipped:
            self.sums["grad_norm"] += grad_norm

    def result(self, accelerator=None) -> dict:
        """The averages of the window; sums are first added up over all processes."""
        s = dict(self.sums)
        seconds = time.perf_counter() - self.started
        if accelerator is not None and accelerator.num_processes > 1:
            total = accelerator.reduce(torch.tensor([s[k] for k in self.SUMS], dtype=torch.float64,
                                                    device=accelerator.device), "sum").cpu().tolist()
            s = dict(zip(self.SUMS, total))
            s["steps"] /= accelerator.num_processes  # every process counts the same steps
            s["skipped"] /= accelerator.num_processes
            s["grad_norm"] /= accelerator.num_processes  # the same clipped norm on every process
            s["kl"] /= accelerator.num_processes  # the same z0 on every process
            s["micro_batches"] /= accelerator.num_processes
        line = {"loss": s["loss"] / max(s["examples"], 1), "kl": s["kl"] / max(s["micro_batches"], 1)}
        if s["chosen"]:
            line.update({"rewards/chosen": s["rewards_chosen"] / s["chosen"], "logps/chosen": s["logps_chosen"] / s["chosen"]})
        if s["rejected"]:
            line.update({"rewards/rejected": s["rewards_rejected"] / s["rejected"],
                         "logps/rejected": s["logps_rejected"] / s["rejected"]})
        if s["chosen"] and s["rejected"]:
            line["rewards/margins"] = line["rewards/chosen"] - line["rewards/rejected"]
        line["count/chosen"], line["count/rejected"] = int(s["chosen"]), int(s["rejected"])
        if s["steps"]:
            stepped = s["steps"] - s["skipped"]
            if stepped:  # a window of skipped steps only has no meaningful norm: no key rather than NaN
                line["grad_norm"] = s["grad_norm"] / stepped
            if s["skipped"]:
                line["skipped_steps"] = int(s["skipped"])
            line["tokens_per_second"] = round(s["tokens"] / max(seconds, 1e-9), 2)  # all processes together
            line["tokens"] = int(s["tokens"])
        return line


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch; on CPU the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
