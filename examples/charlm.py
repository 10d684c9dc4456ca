"""A character-level language model (a small GRU) on text that ships with Python, checked by
``lightning_recipe.strict()``.

The text is the help pages of Python's ``pydoc`` (the ``pydoc_data`` package: the language reference in English), or
the Zen of Python where a distribution leaves ``pydoc_data`` out. The model outputs ``(N, T, C)`` logits and its
``training_step`` flattens them for ``CrossEntropyLoss``: the recipe matches the class dimension on its own, sets the
head bias to the log character frequencies, and checks the first loss against the character entropy.

    python examples/charlm.py                         # 2 epochs (~340 steps), under a minute on a laptop CPU
    python examples/charlm.py --fast                  # 110 steps
    python examples/charlm.py --break shuffle-targets # each sequence gets another's targets: the loss plateaus
                                                      # at the character-frequency (unigram) loss
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_recipe as lr

try:
    from _common import fit_and_report, loggers, parse_args
except ImportError:  # imported as examples.charlm
    from examples._common import fit_and_report, loggers, parse_args

BREAKS = {"shuffle-targets": "each sequence is paired with the targets of another one"}


def python_text(max_chars: int = 200_000) -> str:
    """English text shipped with Python: the pydoc topics (sorted by name), else the Zen of Python."""
    try:
        from pydoc_data.topics import topics

        text = "\n".join(topics[k] for k in sorted(topics))
    except ImportError:  # pragma: no cover - some distributions strip pydoc_data
        import codecs
        import this

        text = codecs.decode(this.s, "rot13") * 50
    return text[:max_chars]


class TextData(L.LightningDataModule):
    """Non-overlapping windows of ``seq_len + 1`` characters: inputs ``(N, T)`` and next-character targets ``(N, T)``;
    the last 10% of the text is for validation."""

    def __init__(self, seq_len: int = 32, batch_size: int = 32, max_chars: int = 200_000, seed: int = 0,
                 broken: Optional[str] = None) -> None:
        super().__init__()
        self.seq_len, self.batch_size, self.max_chars = seq_len, batch_size, max_chars
        self.seed, self.broken = seed, broken
        self.vocab: list[str] = []

    def prepare_vocab(self) -> int:
        text = python_text(self.max_chars)
        self.vocab = sorted(set(text))
        return len(self.vocab)

    def setup(self, stage: str) -> None:
        text = python_text(self.max_chars)
        if not self.vocab:
            self.prepare_vocab()
        index = {c: i for i, c in enumerate(self.vocab)}
        ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        n = (len(ids) - 1) // (self.seq_len + 1)
        windows = ids[: n * (self.seq_len + 1)].view(n, self.seq_len + 1)
        x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        cut = int(0.9 * n)
        y_train = y[:cut]
        if self.broken == "shuffle-targets":
            y_train = y_train[torch.from_numpy(np.random.default_rng(self.seed).permutation(cut))]
        self.train, self.val = TensorDataset(x[:cut], y_train), TensorDataset(x[cut:], y[cut:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=256)


class CharGRU(L.LightningModule):
    """Embedding → GRU → linear head (``head``); outputs ``(N, T, vocab)`` logits."""

    def __init__(self, vocab_size: int, embed: int = 32, hidden: int = 64, lr: float = 5e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab_size, embed)
        self.rnn = nn.GRU(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out)

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return self.loss_fn(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    @torch.no_grad()
    def sample(self, vocab: list[str], prompt: str = "The ", length: int = 120) -> str:
        """Greedy continuation of ``prompt`` (for a look at what the model learned)."""
        index = {c: i for i, c in enumerate(vocab)}
        ids = [index.get(c, 0) for c in prompt]
        self.eval()
        for _ in range(length):
            logits = self(torch.tensor([ids[-64:]], device=self.device))
            ids.append(int(logits[0, -1].argmax()))
        return "".join(vocab[i] for i in ids)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(__doc__, argv, epochs=2, fast_epochs=1, breaks=BREAKS)
    L.seed_everything(args.seed, verbose=False)
    data = TextData(seed=args.seed, broken=args.broken)
    model = CharGRU(vocab_size=data.prepare_vocab())
    trainer = L.Trainer(
        max_epochs=args.max_epochs,
        limit_train_batches=110 if args.fast else None,
        limit_val_batches=4,
        callbacks=lr.strict(),
        logger=loggers(args, "charlm"),
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    code = fit_and_report(trainer, model, data)
    if code == 0:
        print(f"sample:      {model.sample(data.vocab)!r}")
    return code


if __name__ == "__main__":
    sys.exit(main())
