"""kto_lite computes the same KTO loss as TRL's KTOTrainer on the same batch (TRL is a test dependency only).

Setup: a tiny random Llama with a LoRA adapter whose B weights are non-zero (so policy != reference),
TRL's KTOTrainer built on it (reference = the same model with the adapters off), one batch through
TRL's own loss computation (`KTOTrainer._compute_loss`), and kto_lite's `collate` +
`completion_logps` + `kto_loss` on the same examples. TRL pairs the KL rows inside the batch by
rotating the completions by one, (x_1, y_n), (x_2, y_1), ...; that pairing is rebuilt here explicitly.
TRL takes z0 as the clamped mean over its batch, as kto_lite does on one process.
"""

import pytest
import torch
from peft import LoraConfig
from tiny_models import learnable_rows, make_model_dir, write_jsonl
from transformers import AutoTokenizer, LlamaForCausalLM

from kto_lite.data import load_data, tokenize
from kto_lite.model import reference_mode
from kto_lite.training.batching import collate
from kto_lite.training.logps import completion_logps
from kto_lite.training.loss import kto_loss

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

BATCH, MAX_LENGTH, BETA, DESIRABLE_WEIGHT, UNDESIRABLE_WEIGHT = 6, 64, 0.1, 1.5, 0.8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("vs_trl") / "model")


def rows():
    """Plain-text rows, 3 desirable and 3 undesirable; the completion starts with the separating space."""
    return [{**r, "completion": " " + r["completion"]} for r in learnable_rows(BATCH, seed=0)]


@pytest.fixture(scope="module")
def trl_trainer(model_dir, tmp_path_factory):
    """TRL's KTOTrainer for a loss type (built once per module) on the tiny model with a LoRA whose B is non-zero."""
    trainers = {}

    def get(loss_type):
        if loss_type not in trainers:
            trainers[loss_type] = build_trl_trainer(model_dir, tmp_path_factory.mktemp(loss_type), loss_type)
        return trainers[loss_type]

    return get


def build_trl_trainer(model_dir, tmp_path, loss_type):
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = trl.KTOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=BATCH, max_length=MAX_LENGTH,
                         beta=BETA, desirable_weight=DESIRABLE_WEIGHT, undesirable_weight=UNDESIRABLE_WEIGHT,
                         loss_type=loss_type, bf16=False, gradient_checkpointing=False, report_to="none",
                         disable_tqdm=True)
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trl.KTOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows()),
                             processing_class=tokenizer, peft_config=peft_config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:  # fresh LoRA has B = 0, i.e. policy == reference: make them differ
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return trainer


def kto_lite_loss(model, prompts, completions, kl_completions, labels, pad_token_id, loss_type):
    main = collate(prompts, completions, pad_token_id, MAX_LENGTH)
    kl = collate(prompts, kl_completions, pad_token_id, MAX_LENGTH)
    model.eval()
    with torch.no_grad():
        policy, policy_kl = completion_logps(model, main), completion_logps(model, kl)
    with reference_mode(model):
        reference, reference_kl = completion_logps(model, main), completion_logps(model, kl)
    out = kto_loss(policy, reference, labels, policy_kl_logps=policy_kl, reference_kl_logps=reference_kl, beta=BETA, desirable_weight=DESIRABLE_WEIGHT,
                   undesirable_weight=UNDESIRABLE_WEIGHT, loss_type=loss_type)
    return out, policy, (policy_kl - reference_kl).mean()


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_same_loss_rewards_and_kl_as_trl(trl_trainer, loss_type):
    trainer = trl_trainer(loss_type)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train" if trainer.model.training else "eval"].items()}

    data = trainer.train_dataset[:BATCH]  # TRL's own token ids: prompt, completion (+EOS), label
    prompts, completions = data["prompt_ids"], data["completion_ids"]
    kl_completions = [completions[-1]] + completions[:-1]  # TRL's in-batch pairing: rotate by one
    if loss_type == "kto":
        assert data["KL_completion_ids"] == kl_completions
    labels = torch.tensor(data["label"])
    assert labels.any() and not labels.all()
    out, policy, kl_mean = kto_lite_loss(trainer.model, prompts, completions, kl_completions, labels,
                                         trainer.processing_class.pad_token_id, loss_type)

    assert out.rewards.abs().max() > 0.01  # the policy really differs from the reference
    torch.testing.assert_close(out.loss, trl_loss.float(), rtol=1e-5, atol=1e-6)
    if loss_type == "kto":
        assert kl_mean > 0, "pick another LoRA seed: z0 is clamped to 0 and the KL check would be trivial"
        assert metrics["kl"] == pytest.approx(out.kl.item(), rel=1e-4, abs=1e-6)
    else:
        assert metrics["kl"] == 0 and out.kl.item() == 0
    assert metrics["rewards/chosen"] == pytest.approx(out.rewards[labels].mean().item(), rel=1e-4, abs=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(out.rewards[~labels].mean().item(), rel=1e-4, abs=1e-6)
    assert metrics["logps/chosen"] == pytest.approx(policy[labels].mean().item(), rel=1e-5)
    assert metrics["logps/rejected"] == pytest.approx(policy[~labels].mean().item(), rel=1e-5)


def test_plain_text_tokenization_agrees_with_trl(trl_trainer, tmp_path):
    """On plain text (no chat template) kto_lite and TRL train on the very same token ids."""
    trainer = trl_trainer("kto")
    ours = tokenize(load_data(write_jsonl(tmp_path / "rows.jsonl", rows()))[0], trainer.processing_class,
                    max_length=MAX_LENGTH, max_prompt_length=MAX_LENGTH // 2, use_chat_template=False)
    theirs = trainer.train_dataset[:BATCH]
    assert [e.prompt_ids for e in ours] == theirs["prompt_ids"]
    assert [e.completion_ids for e in ours] == theirs["completion_ids"]
    assert [e.label for e in ours] == theirs["label"]
