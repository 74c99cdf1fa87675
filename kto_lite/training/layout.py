"""How a run lays out its rows, decided once before the first pass and used by every pass (docs/design.md).

    padded   one row per sequence, padded to the longest in the micro-batch (works on every model)
    packed   padding-free: the micro-batch's sequences side by side in one row, position ids restarting per
             sequence (logps.supports_packing: same numbers, no padding computed)
    shared   packed, and an example and its KL rows scored after one copy of their common prompt
             (batching.collate_shared, logps.supports_shared_prompts: same numbers, fewer prompt tokens)

The no-grad reference pass shares whenever the model supports it (it only costs less). Training shares
only where the prompts are long enough to pay for the KL tokens joining the backward pass
(SHARE_PROMPT_RATIO, measured), z0 is per micro-batch (kl_over_step off) and every shared row fits
max_length (what `estimate` budgets for). A setting forced in the config (`padding_free`,
`share_prompts`) that the model cannot honour is refused, never silently replaced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kto_lite.config import TrainConfig
from kto_lite.data import TokenizedExample
from kto_lite.errors import ConfigError
from kto_lite.training.logps import attention_implementation, supports_packing, supports_shared_prompts

# share_prompts "auto" shares in training when prompts hold more than this many tokens per completion token
# (by gradient_checkpointing): separate rows cost a forward+backward of prompt+completion plus a no-grad
# forward of prompt+KL completion, shared rows a forward+backward of prompt+completion+KL completion (and,
# with checkpointing, a recompute of it). Measured on SmolLM2-135M, shared / separate step time
# (benchmarks/shared_prompts.py, docs/performance.md section 5): fp32 without checkpointing 0.79 at 7:1,
# 0.90 at 3:1, 0.98 at 1.67:1, 1.04 at 1.21:1 (crossing at ~1.5:1); 4-bit with checkpointing 0.86 at 7:1,
# 0.95 at 3:1, 1.06 at 1.67:1 (crossing at ~2.4:1)
SHARE_PROMPT_RATIO = {False: 1.5, True: 2.4}


@dataclass(frozen=True)
class RowLayout:
    packed: bool  # padding-free rows, in training and in every reference pass
    shared_training: bool  # training rows [prompt | completion | KL completion]
    shared_reference: bool  # reference rows [prompt | completion | KL completion of each distinct pairing]
    why: str  # one line: what was decided and why (printed at start, in status.json)

    def to_dict(self) -> dict:
        return asdict(self)


def decide_layout(model, config: TrainConfig, examples: list[TokenizedExample], kl_partners: list[list[int]]
                  ) -> RowLayout:
    """The run's row layout (module docstring). Probes the model at most once per model (logps.py caches it);
    call it before the model is sharded or wrapped: the probes run the decoder directly."""
    attention = attention_implementation(model)
    if config.padding_free is False:
        packed, why = False, "padded rows (padding_free: false)"
    elif supports_packing(model, config.max_length):
        packed, why = True, f"padding-free rows ({attention} attention restarts at each sequence)"
    elif config.padding_free:
        raise ConfigError(f"padding_free: true, but this model ({attention} attention) does not give packed rows "
                          "the log-probs of padded rows; leave padding_free empty (padded rows are used)")
    else:
        packed, why = False, f"padded rows (packed rows would change this model's numbers: {attention} attention)"
    if config.share_prompts is False or config.loss_type != "kto":
        reason = "share_prompts: false" if config.share_prompts is False else f"{config.loss_type} has no KL rows"
        return RowLayout(packed, False, False, f"{why}; no shared prompts ({reason})")
    supported = packed and supports_shared_prompts(model, config.max_length)
    if config.share_prompts:
        if not supported:
            raise ConfigError("share_prompts: true needs padding-free rows through sdpa or eager attention "
                              f"(this model: padding_free {packed}, attention {attention}); leave it empty")
        if config.kl_over_step:
            raise ConfigError("share_prompts: true needs kl_over_step: false (the KL rows' log-probs come "
                              "from each micro-batch's training forward, not before the step); leave it empty")
        return RowLayout(True, True, True, f"{why}; shared prompts in training and reference passes (share_prompts: "
                                           "true)")
    if not supported:
        return RowLayout(packed, False, False, f"{why}; no shared prompts (needs padding-free rows through sdpa or "
                                               "eager attention)")
    prompt_tokens = sum(len(e.prompt_ids) for e in examples)
    completion_tokens = sum(len(e.completion_ids) for e in examples)
    ratio = SHARE_PROMPT_RATIO[bool(config.gradient_checkpointing)]
    fits = all(len(e.prompt_ids) + len(e.completion_ids) + len(examples[p[i]].completion_ids) <= config.max_length
               for p in kl_partners for i, e in enumerate(examples))
    if config.kl_over_step:
        in_training = "not in training (kl_over_step needs z0 before the step's forwards)"
    elif prompt_tokens <= ratio * completion_tokens:
        in_training = (f"not in training (prompts {prompt_tokens / max(1, completion_tokens):.1f}x the completions' "
                       f"tokens; sharing pays from {ratio}x)")
    elif not fits:
        in_training = "not in training (a shared row would exceed max_length)"
    else:
        return RowLayout(True, True, True, f"{why}; shared prompts in training and reference passes (prompts "
                                           f"{prompt_tokens / max(1, completion_tokens):.1f}x the completions' tokens)")
    return RowLayout(True, False, True, f"{why}; shared prompts in the reference pass, {in_training}")
