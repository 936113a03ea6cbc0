"""A small BERT encoder through lowbit: quantize, fine-tune with distillation, score layers. Nothing is downloaded.

The model is ``BertForSequenceClassification`` built from a ``BertConfig`` with random init; the task is generated
here. Each sequence is ``[CLS] tokens... [SEP] [PAD]...`` of random length and its label (4 classes) combines two
rules over the tokens, which attention has to gather from anywhere in the sequence:

* bit 0: the sum of the fixed random weights (:func:`token_weights`) of the 3-9 "voter" tokens among the filler is
  positive: a weighted vote, decided by a hair near zero, where the precision of the network shows;
* bit 1: ``TRIGGER`` occurs at least twice (2-3 times against 0-1): a count against a threshold.

Factories for the command line (needs ``pip install 'lowbit[hf]'``). The CLI fine-tunes with SGD; encoders want small
learning rates there (``--lr 1e-3``; the recipes' CNN defaults wreck them), or train fp32 by API with AdamW as
:func:`walk_through` does and hand the weights over with ``--weights``::

    lowbit plan --show --model examples/tiny_bert.py:make_model --bits w4a8 --quantize-matmuls
    lowbit train --model examples/tiny_bert.py:make_model --data examples/tiny_bert.py:make_data \
        --weights fp32.pt --epochs 0 --out runs/bert-fp32
    lowbit quantize --from runs/bert-fp32 --bits w4a4 --per-channel --distill --lr 1e-3 --out runs/bert-w4a4
    lowbit sensitivity --from runs/bert-w4a4 --method eagl --out runs/bert-eagl
    lowbit frontier --from runs/bert-w4a4 --methods eagl,alps,random --lr 1e-3 --out runs/bert-frontier

Run this file for the same by API (``python examples/tiny_bert.py``); see :func:`walk_through`.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

PAD, CLS, SEP = 0, 1, 2
TRIGGER = 3
FIRST_VOTER = 4  # tokens 4 .. 19 carry a weight (token_weights)
FIRST_FILLER = 20  # tokens 20 .. vocab-1 are neutral filler
NUM_LABELS = 4


def make_model(num_labels: int = NUM_LABELS, vocab_size: int = 64, hidden_size: int = 32, num_hidden_layers: int = 2,
               num_attention_heads: int = 2, intermediate_size: int = 64, max_position_embeddings: int = 64,
               seed: int | None = None):
    """``BertForSequenceClassification`` from a config, random init (dropout off: short runs on small data)."""
    from lowbit.models.hf import tiny_bert

    return tiny_bert(num_labels=num_labels, vocab_size=vocab_size, hidden_size=hidden_size,
                     num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                     intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                     seed=seed)


class PatternSet(Dataset):
    """``n`` generated examples as dicts: ``input_ids``, ``attention_mask``, ``token_type_ids``, ``labels``."""

    def __init__(self, n: int, seq_len: int = 32, vocab_size: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.full((n, seq_len), PAD, dtype=torch.long)
        self.mask = torch.zeros(n, seq_len, dtype=torch.long)
        self.labels = torch.zeros(n, dtype=torch.long)
        for i in range(n):
            ids, label = _example(seq_len, vocab_size, g)
            self.ids[i, : len(ids)] = ids
            self.mask[i, : len(ids)] = 1
            self.labels[i] = label

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "token_type_ids": torch.zeros_like(self.ids[i]), "labels": self.labels[i]}


def token_weights(vocab_size: int) -> torch.Tensor:
    """A fixed weight per token (voters only; others 0), the same for every split."""
    w = torch.randn(vocab_size, generator=torch.Generator().manual_seed(1234))
    w[:FIRST_VOTER] = 0
    w[FIRST_FILLER:] = 0
    return w


def _example(seq_len: int, vocab_size: int, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """One sequence with its label drawn first, so the four classes are balanced."""
    label = int(torch.randint(NUM_LABELS, (), generator=g))
    positive, many_triggers = bool(label & 1), bool(label & 2)
    length = int(torch.randint(seq_len // 2, seq_len - 1, (), generator=g))  # body tokens, CLS/SEP aside
    n_t = int(torch.randint(2, 4, (), generator=g)) if many_triggers else int(torch.randint(0, 2, (), generator=g))
    n_v = int(torch.randint(3, min(10, length - n_t + 1), (), generator=g))  # voters among neutral filler
    weights = token_weights(vocab_size)
    while True:  # rejection: draw voters until their weighted sum has the label's sign
        voters = torch.randint(FIRST_VOTER, FIRST_FILLER, (n_v,), generator=g)
        if bool(weights[voters].sum() > 0) == positive:
            break
    filler = torch.randint(FIRST_FILLER, vocab_size, (length - n_v - n_t,), generator=g)
    body = torch.cat([voters, filler, torch.full((n_t,), TRIGGER)])[torch.randperm(length, generator=g)]
    return torch.cat([torch.tensor([CLS]), body, torch.tensor([SEP])]), label


def make_data(n_train: int = 2000, n_val: int = 500, n_test: int = 500, seq_len: int = 32, vocab_size: int = 64,
              seed: int = 0):
    """``(train, val, test)`` PatternSets with disjoint seeds (``seq_len`` at least 14)."""
    return (PatternSet(n_train, seq_len, vocab_size, seed), PatternSet(n_val, seq_len, vocab_size, seed + 1),
            PatternSet(n_test, seq_len, vocab_size, seed + 2))


def walk_through(epochs: float = 15, qat_epochs: float = 6, n_train: int = 4000) -> dict[str, float]:
    """fp32 training (AdamW), then W4A8 with quantized attention matmuls, QAT + KD on logits and hidden states,
    and EAGL's layer scores: the recipe of bench/transformer.py, about 3 CPU-minutes on one thread. Returns the
    validation accuracies."""
    import copy

    from lowbit.data import DataSplits
    from lowbit.models.hf import encoder_blocks
    from lowbit.quant import Plan, QuantConfig, calibrate_, quantize_
    from lowbit.sensitivity import score_layers
    from lowbit.train import FitConfig, calibration_batches, evaluate, fit
    from lowbit.train.loop import param_groups

    torch.manual_seed(0)
    data = DataSplits(*make_data(n_train=n_train, n_val=1000))
    model = make_model(hidden_size=64, num_attention_heads=4, intermediate_size=128, seed=0)
    adam = torch.optim.AdamW(param_groups(model, 0.01), lr=5e-3)  # decay on weight matrices only
    fit(model, data, FitConfig(epochs=epochs, batch_size=64, lr=5e-3, warmup_epochs=1, quiet=True), optimizer=adam)
    fp32 = evaluate(model, data.val)[1]
    print(f"fp32 val acc {fp32:.3f}")

    plan = Plan.preset("w4a8", model, example_input=data.example(1))  # by role: embeddings float, head 8 bits
    print(plan)
    qcfg = QuantConfig(per_channel=True, quantize_matmuls=True, activation_init="mse")
    student = quantize_(copy.deepcopy(model), plan, qcfg)  # every Linear + the two attention matmuls
    calibrate_(student, calibration_batches(data, batch_size=64, n_batches=4))
    features = tuple(encoder_blocks(model))  # hidden states of both blocks, distilled with the logits
    cfg = FitConfig(epochs=qat_epochs, batch_size=64, lr=5e-4, distill=True, distill_features=features, quiet=True)
    adam = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)  # after calibration: steps exist
    fit(student, data, cfg, optimizer=adam, teacher=model)
    w4a8 = evaluate(student, data.val)[1]
    print(f"W4A8 val acc {w4a8:.3f}")
    print(score_layers("eagl", student, data).render())
    return {"fp32": fp32, "w4a8": w4a8}


if __name__ == "__main__":
    torch.set_num_threads(1)
    walk_through()
