"""OGM-GE through the Lightning callback (needs `pip install modaldiag[lightning]`).

Run: python examples/lightning_example.py
"""

import lightning.pytorch as pl
import torch

import modaldiag as md
from modaldiag.integrations.lightning import ModalDiagCallback, ModalDiagModule


def main(epochs: int = 8) -> dict:
    data = md.datasets.load("mfeat-fou-pix")
    torch.manual_seed(0)
    lit = ModalDiagModule(md.models.default_model(data), lr=0.01)  # or your own LightningModule
    # whose training_step returns modaldiag_loss(self, batch)
    callback = ModalDiagCallback(md.OGM(alpha=0.8, noise=True))
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[callback], accelerator="cpu", devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(lit, data.train.loader(64, shuffle=True))
    scores = md.unimodal_scores(lit.model, data.test.loader(400))
    result = {m: round(s.accuracy, 3) for m, s in scores.items()}
    last = callback.logs[-1]["regulator"]["coefficient"]
    print(f"OGM coefficient (last epoch mean): {last}; unimodal test accuracy: {result}")
    return result


if __name__ == "__main__":
    main()
